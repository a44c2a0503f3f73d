import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Message archives (XEP-0313) end to end: the real server on SQLite, and again on PostgreSQL when
/// scripts/test reruns the suite.
final class MAMTests: XCTestCase {
    static let users = (1...5).map { ("m\($0)", "pw\($0)") }

    private func login(_ server: ServerProcess, _ number: Int, resource: String = "r") async throws -> TestClient {
        try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct,
                                   username: "m\(number)", password: "pw\(number)", resource: resource)
    }

    private static func config(_ mam: String = "{}") -> String {
        """
        modules:
          disco: {}
          roster: {}
          presence: {}
          offline: {}
          carbons: {}
          blocking: {}
          mam: \(mam)
        """
    }

    /// Available presence, so messages to the bare JID are delivered rather than stored offline.
    private func online(_ client: TestClient) {
        client.send("<presence/>")
    }

    func testBothArchivesWithStanzaIDsCarbonsAndOfflineCopies() async throws {
        let server = try ServerProcess(extraConfig: Self.config(), users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let alice = try await login(server, 1, resource: "phone")
        let aliceLaptop = try await login(server, 1, resource: "laptop")
        let bob = try await login(server, 2)
        for client in [alice, aliceLaptop, bob] { online(client) }
        let carbons = try await aliceLaptop.iq("<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>", id: "c")
        XCTAssertEqual(carbons[attribute: "type"], "result")

        // Features on the account.
        let info = try await alice.iq("<iq type='get' to='m1@localhost' id='d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "d")
        let features = Set(info.child("query")?.elements.compactMap { $0[attribute: "var"] } ?? [])
        XCTAssertTrue(features.isSuperset(of: [MAM.ns, "urn:xmpp:mam:2#extended", MAM.sid]), "\(features)")

        // A spoofed stanza-id claiming bob's archive is stripped; bob gets the archive's own.
        MAM.chat(alice, to: "m2@localhost", "hello bob", extra: "<stanza-id xmlns='\(MAM.sid)' by='m2@localhost' id='forged'/>")
        let live = try await MAM.received(bob, "hello bob")
        let bobIDs = live.elements.filter { $0.name == "stanza-id" && $0[attribute: "by"] == "m2@localhost" }
        XCTAssertEqual(bobIDs.count, 1)
        XCTAssertNotEqual(bobIDs.first?[attribute: "id"], "forged")
        XCTAssertNil(MAM.stanzaID(live, by: "m1@localhost"), "the sender's archive id never reaches the contact")
        // The sender's other resource gets a carbon carrying the sender's archive id.
        let carbon = try await aliceLaptop.expect("sent carbon") { $0.child("sent", namespace: "urn:xmpp:carbons:2") != nil }
        let carbonCopy = carbon.child("sent")?.child("forwarded")?.child("message")
        let aliceID = carbonCopy.flatMap { MAM.stanzaID($0, by: "m1@localhost") }
        XCTAssertNotNil(aliceID)

        MAM.chat(bob, to: "m1@localhost/phone", "hello alice")
        let reply = try await MAM.received(alice, "hello alice")
        XCTAssertNotNil(MAM.stanzaID(reply, by: "m1@localhost"))

        // Both archives hold both messages, under the ids their owners were told.
        let bobArchive = try await MAM.query(bob)
        XCTAssertEqual(bobArchive.bodies, ["hello bob", "hello alice"])
        XCTAssertEqual(bobArchive.ids.first, bobIDs.first?[attribute: "id"])
        XCTAssertTrue(bobArchive.complete)
        let aliceArchive = try await MAM.query(alice)
        XCTAssertEqual(aliceArchive.bodies, ["hello bob", "hello alice"])
        XCTAssertEqual(aliceArchive.ids, [aliceID, MAM.stanzaID(reply, by: "m1@localhost")].compactMap { $0 })

        // Not archived: chat states alone, errors, headlines, no-store, no-permanent-store.
        bob.send("<message to='m1@localhost/phone' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>")
        bob.send("<message to='m1@localhost/phone' type='headline'><body>news</body></message>")
        MAM.chat(bob, to: "m1@localhost/phone", "secret", extra: "<no-store xmlns='urn:xmpp:hints'/>")
        MAM.chat(bob, to: "m1@localhost/phone", "ephemeral", extra: "<no-permanent-store xmlns='urn:xmpp:hints'/>")
        let secret = try await MAM.received(alice, "secret")
        XCTAssertNil(MAM.stanzaID(secret, by: "m1@localhost"))
        _ = try await MAM.received(alice, "ephemeral")
        // An encrypted payload without a body is archived.
        bob.send("<message to='m1@localhost/phone' type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'><payload>AAAA</payload></encrypted></message>")
        let encrypted = try await alice.expect("encrypted") { $0.child("encrypted") != nil }
        XCTAssertNotNil(MAM.stanzaID(encrypted, by: "m1@localhost"))
        MAM.chat(bob, to: "m1@localhost/phone", "marker")
        _ = try await MAM.received(alice, "marker")
        let after = try await MAM.query(alice, fields: ["after-id": [aliceArchive.ids[1]]])
        XCTAssertEqual(after.messages.count, 2)
        XCTAssertNotNil(after.messages.first?.child("encrypted"))
        XCTAssertEqual(after.bodies, ["marker"])

        // Offline: stored with the stanza-id the archive gave it.
        let carol = "m3@localhost"
        MAM.chat(alice, to: carol, "while you were away")
        var carolClient: TestClient?
        var offlineCopy: XMLElement?
        // The archive write and the offline store are independent: wait until the offline copy exists.
        for _ in 0..<100 where offlineCopy == nil {
            let client = try await login(server, 3)
            online(client)
            offlineCopy = try? await client.expect("offline message", timeout: 0.5) { $0.child("body")?.text == "while you were away" }
            carolClient = client
        }
        let carolArchive = try await MAM.query(try XCTUnwrap(carolClient))
        XCTAssertEqual(carolArchive.bodies, ["while you were away"])
        XCTAssertEqual(offlineCopy.flatMap { MAM.stanzaID($0, by: carol) }, carolArchive.ids.first)

        // Messages to an account that does not exist are not archived anywhere (nor is there an archive to query).
        MAM.chat(alice, to: "nobody@localhost", "into the void")
        _ = try await alice.expect("bounce") { $0[attribute: "type"] == "error" && $0.child("body")?.text == "into the void" }
    }

    func testPagingFiltersAndErrors() async throws {
        let server = try ServerProcess(extraConfig: Self.config("{ page_size: 10, max_page_size: 20 }"), users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let alice = try await login(server, 1)
        let bob = try await login(server, 2, resource: "desk")
        let carol = try await login(server, 3)
        for client in [alice, bob, carol] { online(client) }
        let before = Date()
        for index in 0..<25 {
            let (from, to) = index % 5 == 4 ? (carol, "m1@localhost") : (bob, "m1@localhost")
            MAM.chat(from, to: to, "n\(index)")
            _ = try await MAM.received(alice, "n\(index)")
        }
        let all = (0..<25).map { "n\($0)" }

        // Forward to the end, pages of the default size; the last is complete.
        var page = try await MAM.query(alice)
        XCTAssertEqual(page.bodies, Array(all[0..<10]))
        XCTAssertFalse(page.complete)
        XCTAssertEqual(page.first, page.ids.first)
        XCTAssertEqual(page.last, page.ids.last)
        var collected = page.bodies
        while !page.complete {
            page = try await MAM.query(alice, rsm: "<after>\(page.last!)</after>")
            collected += page.bodies
        }
        XCTAssertEqual(collected, all)
        // The server caps what a query asks.
        let capped = try await MAM.query(alice, rsm: "<max>100</max>")
        XCTAssertEqual(capped.messages.count, 20)
        // Backward: the last page, then earlier ones to the start.
        page = try await MAM.query(alice, rsm: "<max>7</max><before/>")
        XCTAssertEqual(page.bodies, Array(all[18...]))
        collected = page.bodies
        while !page.complete {
            page = try await MAM.query(alice, rsm: "<max>7</max><before>\(page.first!)</before>")
            collected = page.bodies + collected
        }
        XCTAssertEqual(collected, all)
        let ids = try await MAM.query(alice, rsm: "<max>20</max>").ids + MAM.query(alice, rsm: "<max>20</max><before/>").ids.suffix(5)
        XCTAssertEqual(ids.count, 25)
        // A flipped page is the same page, newest first.
        let flipped = try await MAM.query(alice, rsm: "<max>5</max><before/>", extra: "<flip-page/>")
        XCTAssertEqual(flipped.bodies, Array(all[20...].reversed()))
        // Only the count.
        let counted = try await MAM.query(alice, fields: ["with": ["m3@localhost"]], rsm: "<max>0</max>")
        XCTAssertEqual(counted.fin.child("set", namespace: MAM.rsm)?.child("count", namespace: MAM.rsm)?.text, "5")

        // Filters: with (bare, full, unknown resource), time, ids, between ids.
        let fromCarol = try await MAM.query(alice, fields: ["with": ["m3@localhost"]])
        XCTAssertEqual(fromCarol.bodies, ["n4", "n9", "n14", "n19", "n24"])
        let fromDesk = try await MAM.query(alice, fields: ["with": ["m2@localhost/desk"]], rsm: "<max>20</max>")
        XCTAssertEqual(fromDesk.messages.count, 20)
        let fromElsewhere = try await MAM.query(alice, fields: ["with": ["m2@localhost/tablet"]])
        XCTAssertEqual(fromElsewhere.messages.count, 0)
        XCTAssertTrue(fromElsewhere.complete)
        let future = try await MAM.query(alice, fields: ["start": [XMPPDateTime.string(Date().addingTimeInterval(3600))]])
        XCTAssertEqual(future.messages.count, 0)
        let past = try await MAM.query(alice, fields: ["end": [XMPPDateTime.string(before.addingTimeInterval(-3600))]])
        XCTAssertEqual(past.messages.count, 0)
        let window = try await MAM.query(alice, fields: ["start": [XMPPDateTime.string(before.addingTimeInterval(-5))],
                                                         "end": [XMPPDateTime.string(Date().addingTimeInterval(5))]], rsm: "<max>20</max>")
        XCTAssertEqual(window.messages.count, 20)
        let picked = try await MAM.query(alice, fields: ["ids": [ids[3], ids[17]]])
        XCTAssertEqual(picked.bodies, ["n3", "n17"])
        let between = try await MAM.query(alice, fields: ["after-id": [ids[2]], "before-id": [ids[6]]])
        XCTAssertEqual(between.bodies, ["n3", "n4", "n5"])

        // Full-text search where the backend offers it (PostgreSQL); elsewhere the field is unknown.
        if ServerProcess.defaultBackend == .postgresql {
            let found = try await MAM.query(alice, fields: ["{urn:xmpp:fulltext:0}fulltext": ["n7"]])
            XCTAssertEqual(found.bodies, ["n7"])
        } else {
            let unsupported = try await MAM.refusal(alice, fields: ["{urn:xmpp:fulltext:0}fulltext": ["n7"]])
            XCTAssertEqual(unsupported, "feature-not-implemented")
        }

        // Metadata and the form.
        let metadata = try await alice.iq("<iq type='get' id='md'><metadata xmlns='\(MAM.ns)'/></iq>", id: "md")
        XCTAssertEqual(metadata.child("metadata")?.child("start")?[attribute: "id"], ids.first)
        XCTAssertEqual(metadata.child("metadata")?.child("end")?[attribute: "id"], ids.last)
        let sentOnly = try await carol.iq("<iq type='get' id='md2'><metadata xmlns='\(MAM.ns)'/></iq>", id: "md2")
        XCTAssertEqual(sentOnly.child("metadata")?.elements.count, 2, "what carol sent is in her archive")
        let dave = try await login(server, 4)
        let empty = try await dave.iq("<iq type='get' id='md3'><metadata xmlns='\(MAM.ns)'/></iq>", id: "md3")
        XCTAssertEqual(empty.child("metadata")?.elements.count, 0)
        let form = try await alice.iq("<iq type='get' id='f'><query xmlns='\(MAM.ns)'/></iq>", id: "f")
        let vars = Set(form.child("query")?.child("x")?.elements.compactMap { $0[attribute: "var"] } ?? [])
        XCTAssertTrue(vars.isSuperset(of: ["FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids"]), "\(vars)")

        // Errors.
        let unknownField = try await MAM.refusal(alice, fields: ["colour": ["red"]])
        XCTAssertEqual(unknownField, "feature-not-implemented")
        let badDate = try await MAM.refusal(alice, fields: ["start": ["yesterday"]])
        XCTAssertEqual(badDate, "bad-request")
        let badJID = try await MAM.refusal(alice, fields: ["with": ["@@"]])
        XCTAssertEqual(badJID, "bad-request")
        let unknownAfter = try await MAM.refusal(alice, rsm: "<after>0000000000000000deadbeef</after>")
        XCTAssertEqual(unknownAfter, "item-not-found")
        let unknownBefore = try await MAM.refusal(alice, rsm: "<before>garbage</before>")
        XCTAssertEqual(unknownBefore, "item-not-found")
        let unknownIDs = try await MAM.refusal(alice, fields: ["ids": [ids[0], "0123"]])
        XCTAssertEqual(unknownIDs, "item-not-found")
        let otherIDs = try await MAM.refusal(carol, fields: ["after-id": [ids[0]]])
        XCTAssertEqual(otherIDs, "item-not-found", "another archive's ids are unknown here")
        let foreign = try await MAM.refusal(bob, archive: "m1@localhost")
        XCTAssertEqual(foreign, "forbidden")
        let wrongFormType = try await MAM.refusal(alice, extra: "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>urn:other</value></field></x>")
        XCTAssertEqual(wrongFormType, "bad-request")
    }

    private func prefs(_ client: TestClient, _ xml: String) async throws -> XMLElement {
        let id = "p-\(UUID().uuidString.prefix(6))"
        return try await client.iq("<iq type='set' id='\(id)'>\(xml)</iq>", id: id)
    }

    func testPreferencesDecideWhatIsArchivedAndSurviveARestart() async throws {
        var server = try ServerProcess(extraConfig: Self.config(), users: Self.users)
        var alice = try await login(server, 1)
        let bob = try await login(server, 2)
        let carol = try await login(server, 3)
        let dave = try await login(server, 4)
        for client in [alice, bob, carol, dave] { online(client) }
        let initial = try await alice.iq("<iq type='get' id='g'><prefs xmlns='\(MAM.ns)'/></iq>", id: "g")
        XCTAssertEqual(initial.child("prefs")?[attribute: "default"], "always")

        // Never bob: his messages are not archived for alice (and carry no stanza-id), but still are for him.
        let set = try await prefs(alice, "<prefs xmlns='\(MAM.ns)' default='always'><always/><never><jid>m2@localhost</jid></never></prefs>")
        XCTAssertEqual(set.child("prefs")?.child("never")?.child("jid")?.text, "m2@localhost")
        MAM.chat(bob, to: "m1@localhost", "not for the record")
        let unrecorded = try await MAM.received(alice, "not for the record")
        XCTAssertNil(MAM.stanzaID(unrecorded, by: "m1@localhost"))
        MAM.chat(carol, to: "m1@localhost", "on the record")
        _ = try await MAM.received(alice, "on the record")
        var archive = try await MAM.query(alice)
        XCTAssertEqual(archive.bodies, ["on the record"])
        let bobs = try await MAM.query(bob)
        XCTAssertEqual(bobs.bodies, ["not for the record"])

        // Default never, but always carol (a full JID matches only that resource).
        _ = try await prefs(alice, "<prefs xmlns='\(MAM.ns)' default='never'><always><jid>m3@localhost</jid><jid>m4@localhost/elsewhere</jid></always><never/></prefs>")
        MAM.chat(carol, to: "m1@localhost", "carol always")
        MAM.chat(dave, to: "m1@localhost", "dave never")
        _ = try await MAM.received(alice, "carol always")
        _ = try await MAM.received(alice, "dave never")
        MAM.chat(alice, to: "m4@localhost", "to dave, unrecorded")
        MAM.chat(alice, to: "m3@localhost", "to carol, recorded")
        _ = try await MAM.received(carol, "to carol, recorded")
        archive = try await MAM.query(alice)
        XCTAssertEqual(archive.bodies, ["on the record", "carol always", "to carol, recorded"])

        // Roster: dave once he is a contact.
        _ = try await prefs(alice, "<prefs xmlns='\(MAM.ns)' default='roster'/>")
        MAM.chat(dave, to: "m1@localhost", "dave, a stranger")
        _ = try await MAM.received(alice, "dave, a stranger")
        _ = try await alice.iq("<iq type='set' id='ro'><query xmlns='jabber:iq:roster'><item jid='m4@localhost'/></query></iq>", id: "ro")
        MAM.chat(dave, to: "m1@localhost", "dave, a contact")
        _ = try await MAM.received(alice, "dave, a contact")
        archive = try await MAM.query(alice, fields: ["with": ["m4@localhost"]])
        XCTAssertEqual(archive.bodies, ["dave, a contact"])

        // Refused preferences change nothing.
        let bad = try await prefs(alice, "<prefs xmlns='\(MAM.ns)' default='sometimes'/>")
        XCTAssertEqual(MUC.errorCondition(bad), "bad-request")
        let malformed = try await prefs(alice, "<prefs xmlns='\(MAM.ns)' default='always'><always><jid>@@</jid></always></prefs>")
        XCTAssertEqual(MUC.errorCondition(malformed), "jid-malformed")

        // After a restart the preferences still hold.
        XCTAssertEqual(server.stop(), 0)
        server = try ServerProcess(restarting: server)
        defer { XCTAssertEqual(server.stop(), 0) }
        alice = try await login(server, 1)
        let dave2 = try await login(server, 4)
        let eve = try await login(server, 5)
        for client in [alice, dave2, eve] { online(client) }
        let kept = try await alice.iq("<iq type='get' id='g2'><prefs xmlns='\(MAM.ns)'/></iq>", id: "g2")
        XCTAssertEqual(kept.child("prefs")?[attribute: "default"], "roster")
        MAM.chat(eve, to: "m1@localhost", "eve, a stranger")
        MAM.chat(dave2, to: "m1@localhost", "dave again")
        _ = try await MAM.received(alice, "eve, a stranger")
        _ = try await MAM.received(alice, "dave again")
        archive = try await MAM.query(alice, rsm: "<max>2</max><before/>")
        XCTAssertEqual(archive.bodies, ["dave, a contact", "dave again"])
    }

    func testRetentionLimitsAndAccountRemoval() async throws {
        let server = try ServerProcess(extraConfig: Self.config("{ max_messages: 3 }"), users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let alice = try await login(server, 1)
        let bob = try await login(server, 2)
        for client in [alice, bob] { online(client) }
        for index in 1...6 {
            MAM.chat(bob, to: "m1@localhost", "r\(index)")
            _ = try await MAM.received(alice, "r\(index)")
        }
        // Trimming runs after the write: wait for it rather than for a time.
        var archive = try await MAM.query(alice)
        for _ in 0..<200 where archive.messages.count > 3 {
            try await Task.sleep(for: .milliseconds(20))
            archive = try await MAM.query(alice)
        }
        XCTAssertEqual(archive.bodies, ["r4", "r5", "r6"], "the oldest go first")

        // Deleting the account deletes its archive: a new account of the same name starts empty.
        await alice.close()
        let (removed, removeOutput) = try server.ctl(["unregister", "m1", "localhost"])
        XCTAssertEqual(removed, 0, removeOutput)
        let (registered, registerOutput) = try server.ctl(["register", "m1", "localhost", "again"])
        XCTAssertEqual(registered, 0, registerOutput)
        let newcomer = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "m1", password: "again")
        archive = try await MAM.query(newcomer)
        XCTAssertEqual(archive.messages.count, 0)
    }

    func testARestartLosesNoArchivedMessageAndOldOnesExpire() async throws {
        var server = try ServerProcess(extraConfig: Self.config(), users: Self.users)
        let alice = try await login(server, 1)
        let bob = try await login(server, 2)
        for client in [alice, bob] { online(client) }
        // Old history, as if archived two years ago (imported), for the expiry below.
        let old = """
            <server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'><user name='old' password='old-pw'>
            <archive xmlns='urn:xmpp:pie:0#mam'><result xmlns='urn:xmpp:mam:2' id='x'><forwarded xmlns='urn:xmpp:forward:0'>
            <delay xmlns='urn:xmpp:delay' stamp='\(XMPPDateTime.string(Date().addingTimeInterval(-2 * 365 * 86_400)))'/>
            <message xmlns='jabber:client' from='m2@localhost/r' to='old@localhost' type='chat'><body>ancient</body></message>
            </forwarded></result></archive></user></host></server-data>
            """
        let oldPath = server.directory.appendingPathComponent("old.xml").path
        try old.write(toFile: oldPath, atomically: true, encoding: .utf8)
        XCTAssertEqual(try server.ctl(["import", oldPath]).0, 0)

        // A burst, then SIGTERM as soon as the last message is delivered: what is queued is stored first.
        let total = 300
        for index in 0..<total { MAM.chat(bob, to: "m1@localhost", "b\(index)") }
        _ = try await MAM.received(alice, "b\(total - 1)")
        XCTAssertEqual(server.stop(), 0)

        // Back with a retention of a year: everything from the burst is there, the ancient message is not.
        let configuration = try String(contentsOfFile: server.configPath, encoding: .utf8)
        try configuration.replacingOccurrences(of: "mam: {}", with: "mam: { retention_days: 365 }").write(toFile: server.configPath, atomically: true, encoding: .utf8)
        server = try ServerProcess(restarting: server)
        defer { XCTAssertEqual(server.stop(), 0) }
        let alice2 = try await login(server, 1)
        let counted = try await MAM.query(alice2, rsm: "<max>0</max>")
        XCTAssertEqual(counted.fin.child("set", namespace: MAM.rsm)?.child("count", namespace: MAM.rsm)?.text, "\(total)")
        let bob2 = try await login(server, 2)
        let sent = try await MAM.query(bob2, rsm: "<max>0</max>")
        XCTAssertEqual(sent.fin.child("set", namespace: MAM.rsm)?.child("count", namespace: MAM.rsm)?.text, "\(total)")
        let oldAccount = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "old", password: "old-pw")
        var ancient = try await MAM.query(oldAccount)
        // The sweep runs once the module is up: wait for it rather than for a time.
        for _ in 0..<200 where !ancient.messages.isEmpty {
            try await Task.sleep(for: .milliseconds(20))
            ancient = try await MAM.query(oldAccount)
        }
        XCTAssertEqual(ancient.messages.count, 0)
    }

    func testRoomArchives() async throws {
        let config = """
        modules:
          disco: {}
          roster: {}
          presence: {}
          muc: {}
          mam: {}
        """
        let server = try ServerProcess(extraConfig: config, users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let owner = try await login(server, 1)
        let guest = try await login(server, 2)
        let stranger = try await login(server, 3)
        let room = "hist@\(MUC.service)"
        try await MUC.createInstantRoom(owner, "hist", nick: "Owner")
        let persistent = try await MUC.configure(owner, "hist", ["persistentroom": ["1"]])
        XCTAssertEqual(persistent[attribute: "type"], "result")
        let info = try await guest.iq("<iq type='get' to='\(room)' id='i'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "i")
        let features = Set(info.child("query")?.elements.compactMap { $0[attribute: "var"] } ?? [])
        XCTAssertTrue(features.isSuperset(of: [MAM.ns, "urn:xmpp:mam:2#extended"]), "\(features)")
        _ = try await MUC.join(guest, "hist", nick: "Guest")
        var live: [String] = []
        for (client, body) in [(owner, "one"), (guest, "two"), (owner, "three")] {
            MUC.groupchat(client, "hist", body)
            let echoed = try await MUC.message(guest, from: "\(room)/\(client === owner ? "Owner" : "Guest")", body: body)
            live.append(MAM.stanzaID(echoed, by: room) ?? "?")
        }
        // Anyone who may enter reads it, even without being in the room; one copy per message.
        let page = try await MAM.query(stranger, archive: room)
        XCTAssertEqual(page.bodies, ["one", "two", "three"])
        XCTAssertEqual(page.ids, live, "the ids occupants saw live")
        XCTAssertEqual(page.messages.map { $0[attribute: "from"] }, ["\(room)/Owner", "\(room)/Guest", "\(room)/Owner"])
        XCTAssertTrue(page.messages.allSatisfy { $0[attribute: "to"] == nil })
        XCTAssertTrue(page.messages.allSatisfy { $0.child("x", namespace: MUC.user) == nil }, "a semi-anonymous room hides real JIDs")
        let filtered = try await MAM.refusal(stranger, archive: room, fields: ["with": ["m1@localhost"]])
        XCTAssertEqual(filtered, "forbidden")
        // Its owner sees who sent what, and may filter by it.
        let seen = try await MAM.query(owner, archive: room, fields: ["with": ["m2@localhost"]])
        XCTAssertEqual(seen.bodies, ["two"])
        XCTAssertEqual(seen.messages.first?.child("x", namespace: MUC.user)?.child("item")?[attribute: "jid"], "m2@localhost/r")
        let last = try await MAM.query(guest, archive: room, rsm: "<max>1</max><before/>")
        XCTAssertEqual(last.bodies, ["three"])
        XCTAssertFalse(last.complete)
        let metadata = try await guest.iq("<iq type='get' to='\(room)' id='md'><metadata xmlns='\(MAM.ns)'/></iq>", id: "md")
        XCTAssertEqual(metadata.child("metadata")?.child("end")?[attribute: "id"], live.last)
        // A user's own archive does not hold groupchat.
        let own = try await MAM.query(guest)
        XCTAssertEqual(own.messages.count, 0)

        // Members-only: only members read; banned users never.
        _ = try await MUC.configure(owner, "hist", ["membersonly": ["1"]])
        let outsider = try await MAM.refusal(stranger, archive: room)
        XCTAssertEqual(outsider, "registration-required")
        _ = try await MUC.admin(owner, "hist", "<item affiliation='member' jid='m3@localhost'/>")
        let member = try await MAM.query(stranger, archive: room)
        XCTAssertEqual(member.messages.count, 3)
        _ = try await MUC.admin(owner, "hist", "<item affiliation='outcast' jid='m3@localhost'/>")
        let banned = try await MAM.refusal(stranger, archive: room)
        XCTAssertEqual(banned, "forbidden")

        // Archiving switched off: no feature, no archive; switched on again, the archive is still there.
        _ = try await MUC.configure(owner, "hist", ["enablearchiving": ["0"]])
        let off = try await MAM.refusal(owner, archive: room)
        XCTAssertEqual(off, "service-unavailable")
        MUC.groupchat(owner, "hist", "unrecorded")
        _ = try await MUC.message(owner, from: "\(room)/Owner", body: "unrecorded")
        _ = try await MUC.configure(owner, "hist", ["enablearchiving": ["1"]])
        let back = try await MAM.query(owner, archive: room)
        XCTAssertEqual(back.bodies, ["one", "two", "three"])

        // Destroyed, the archive goes with the room: a new room of that name starts empty.
        let destroyed = try await owner.iq("<iq type='set' to='\(room)' id='d'><query xmlns='\(MUC.owner)'><destroy/></query></iq>", id: "d")
        XCTAssertEqual(destroyed[attribute: "type"], "result")
        _ = try await MUC.presence(owner, from: "\(room)/Owner", type: "unavailable")
        try await MUC.createInstantRoom(owner, "hist", nick: "Owner")
        _ = try await MUC.configure(owner, "hist", ["persistentroom": ["1"]])
        let fresh = try await MAM.query(owner, archive: room)
        XCTAssertEqual(fresh.messages.count, 0)
        // A temporary room keeps no archive.
        try await MUC.createInstantRoom(owner, "fleeting", nick: "Owner")
        let temporary = try await MAM.refusal(owner, archive: "fleeting@\(MUC.service)")
        XCTAssertEqual(temporary, "service-unavailable")
    }

    func testSlixmppPagesThroughBothKindsOfArchive() async throws {
        let server = try ServerProcess(extraConfig: Self.config() + "\n  muc: {}\n", users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let (status, output) = try ServerProcess.slixmpp([
            "mam", "--port", "\(server.starttlsPort)", "--tls", "starttls", "--count", "23", "--room", "slixmpp@\(MUC.service)",
            "--jid-a", "m1@localhost", "--password-a", "pw1", "--jid-b", "m2@localhost", "--password-b", "pw2",
        ])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("OK"), output)
    }
}
