import Crypto
import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Transcript-style tests of offline storage, blocking, private XML, vCard/avatar hashes, last activity
/// and carbons on the real server.
final class IMModulesTests: XCTestCase {
    static let users = (1...26).map { ("m\($0)", "pw\($0)") }
    nonisolated(unsafe) static var server: ServerProcess!

    static let turnSecretFile = FileManager.default.temporaryDirectory.appendingPathComponent("starling-turn-\(UUID().uuidString)").path
    static let turnSecret = "coturn-static-auth-secret"

    override class func setUp() {
        super.setUp()
        do {
            try turnSecret.write(toFile: turnSecretFile, atomically: true, encoding: .utf8)
            server = try ServerProcess(extraConfig: """
        modules:
          disco: { admin_addresses: ["mailto:admin@localhost", "xmpp:admin@localhost"], abuse_addresses: ["https://localhost/abuse"] }
          ping: {}
          roster: {}
          presence: {}
          offline: { max_messages: 3 }
          blocking: {}
          privacy: {}
          private: {}
          vcard: {}
          last: {}
          carbons: {}
          csi: {}
          register: { allow_registration: true, min_interval: 3600, min_password_length: 6 }
          extdisco: { stun_host: stun.localhost, turn_host: turn.localhost, turn_port: 3479, turn_transport: tcp, turn_secret_file: "\(turnSecretFile)" }
        """, users: users)
        } catch {
            startFailure = error
        }
    }

    nonisolated(unsafe) static var startFailure: (any Error)?

    override func setUpWithError() throws {
        if let failure = Self.startFailure { throw failure }
    }

    override class func tearDown() {
        try? FileManager.default.removeItem(atPath: turnSecretFile)
        startFailure = nil
        XCTAssertEqual(server?.stop() ?? 0, 0)
        server = nil
        super.tearDown()
    }

    private func login(_ number: Int, resource: String? = nil, presence: Bool = true) async throws -> TestClient {
        try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct,
                                   username: "m\(number)", password: "pw\(number)", resource: resource, presence: presence)
    }

    private func expect(_ client: TestClient, _ description: String, timeout: Double = 10, where matches: @escaping (XMLElement) -> Bool) async throws -> XMLElement {
        let event = try await client.waitFor(timeout: timeout, description) { event in
            if case .element(let e) = event { return matches(e) }
            return false
        }
        guard case .element(let element) = event else { throw TestClientError.unexpected("\(event)") }
        return element
    }

    private func iq(_ client: TestClient, _ xml: String, id: String) async throws -> XMLElement {
        client.send(xml)
        return try await expect(client, "iq \(id)") { $0.name == "iq" && $0[attribute: "id"] == id && ($0[attribute: "type"] == "result" || $0[attribute: "type"] == "error") }
    }

    private func errorCondition(_ stanza: XMLElement) -> String? {
        stanza.child("error")?.elements.first { $0.namespace == Namespace.stanzaErrors }?.name
    }

    private func chat(to: String, body: String, extra: String = "") -> String {
        "<message to='\(to)' type='chat' id='\(UUID().uuidString)'><body>\(body)</body>\(extra)</message>"
    }

    private func message(_ client: TestClient, body: String) async throws -> XMLElement {
        try await expect(client, "message '\(body)'") { $0.name == "message" && $0.child("body")?.text == body }
    }

    // MARK: Discovery

    func testTheServerListsItsContactAddresses() async throws {
        let client = try await login(20)
        let info = try await iq(client, "<iq type='get' id='ci' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "ci")
        let form = try XCTUnwrap(info.child("query")?.child("x", namespace: "jabber:x:data"), info.serialized())
        func values(_ variable: String) -> [String]? {
            form.elements.first { $0[attribute: "var"] == variable }?.elements.filter { $0.name == "value" }.map(\.text)
        }
        XCTAssertEqual(values("FORM_TYPE"), ["http://jabber.org/network/serverinfo"])
        XCTAssertEqual(values("admin-addresses"), ["mailto:admin@localhost", "xmpp:admin@localhost"])
        XCTAssertEqual(values("abuse-addresses"), ["https://localhost/abuse"])
        XCTAssertNil(values("sales-addresses"), "roles without addresses are left out")
        await client.close()
    }

    func testCallServicesWithShortLivedTURNCredentials() async throws {
        let client = try await login(19)
        let all = try await iq(client, "<iq type='get' id='es' to='localhost'><services xmlns='urn:xmpp:extdisco:2'/></iq>", id: "es")
        let services = all.child("services")?.elements ?? []
        XCTAssertEqual(services.map { $0[attribute: "type"] }, ["stun", "turn"], all.serialized())
        XCTAssertNil(services.first?[attribute: "password"], "STUN needs no credentials")
        let turn = try XCTUnwrap(services.last)
        XCTAssertEqual(turn[attribute: "host"], "turn.localhost")
        XCTAssertEqual(turn[attribute: "port"], "3479")
        XCTAssertEqual(turn[attribute: "transport"], "tcp")
        // The TURN REST scheme: username "<expiry>:<user>", password base64(HMAC-SHA1(secret, username)).
        let username = try XCTUnwrap(turn[attribute: "username"])
        let parts = username.split(separator: ":", maxSplits: 1)
        XCTAssertEqual(parts.last.map(String.init), "m19@localhost")
        XCTAssertGreaterThan(Double(parts.first ?? "") ?? 0, Date().timeIntervalSince1970, "the credentials expire in the future")
        let expected = Data(HMAC<Insecure.SHA1>.authenticationCode(for: Data(username.utf8), using: SymmetricKey(data: Data(Self.turnSecret.utf8))))
        XCTAssertEqual(turn[attribute: "password"], expected.base64EncodedString())

        let onlyTurn = try await iq(client, "<iq type='get' id='et' to='localhost'><services xmlns='urn:xmpp:extdisco:2' type='turn'/></iq>", id: "et")
        XCTAssertEqual(onlyTurn.child("services")?.elements.map { $0[attribute: "type"] }, ["turn"])
        let credentials = try await iq(client, "<iq type='get' id='ec' to='localhost'><credentials xmlns='urn:xmpp:extdisco:2'><service host='turn.localhost' type='turn'/></credentials></iq>", id: "ec")
        XCTAssertNotNil(credentials.child("credentials")?.child("service")?[attribute: "password"], credentials.serialized())
        let unknown = try await iq(client, "<iq type='get' id='eu' to='localhost'><credentials xmlns='urn:xmpp:extdisco:2'><service host='elsewhere' type='turn'/></credentials></iq>", id: "eu")
        XCTAssertEqual(errorCondition(unknown), "item-not-found")
        await client.close()
    }

    // MARK: Privacy lists

    private func privacy(_ client: TestClient, _ body: String, id: String) async throws -> XMLElement {
        try await iq(client, "<iq type='set' id='\(id)'><query xmlns='jabber:iq:privacy'>\(body)</query></iq>", id: id)
    }

    func testPrivacyListsBlockByJIDGroupAndKindAndShowTheBlocklist() async throws {
        let alice = try await login(21, resource: "a")
        let aliceOther = try await login(21, resource: "b")
        let bob = try await login(22, resource: "b")
        let carol = try await login(23, resource: "c")
        try await befriend(alice, "m21@localhost", bob, "m22@localhost")

        // A list that refuses Bob's messages, made active for one session.
        let created = try await privacy(alice, "<list name='noBob'><item type='jid' value='m22@localhost' action='deny' order='1'><message/></item></list>", id: "l1")
        XCTAssertEqual(created[attribute: "type"], "result", created.serialized())
        let pushed = try await expect(aliceOther, "privacy push") { $0.name == "iq" && $0.child("query", namespace: "jabber:iq:privacy")?.child("list")?[attribute: "name"] == "noBob" }
        aliceOther.send("<iq type='result' id='\(pushed[attribute: "id"]!)'/>")
        _ = try await privacy(alice, "<active name='noBob'/>", id: "l2")
        bob.send(chat(to: "m21@localhost/a", body: "can you hear me"))
        let refused = try await expect(bob, "refusal") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(errorCondition(refused), "service-unavailable")
        // The other session has no active list and no default applies: it still hears Bob.
        bob.send(chat(to: "m21@localhost/b", body: "and you?"))
        _ = try await message(aliceOther, body: "and you?")
        carol.send(chat(to: "m21@localhost/a", body: "carol gets through"))
        let next = try await expect(alice, "the next message") { $0.name == "message" && $0.child("body") != nil }
        XCTAssertEqual(next.child("body")?.text, "carol gets through", "nothing from Bob before Carol's message")

        // IQs and incoming presence, each by a rule of its own kind.
        _ = try await privacy(alice, """
            <list name='noBob'><item type='jid' value='m22@localhost' action='deny' order='1'><message/></item>\
            <item type='jid' value='m22@localhost' action='deny' order='2'><iq/></item>\
            <item type='jid' value='m22@localhost' action='deny' order='3'><presence-in/></item></list>
            """, id: "l1b")
        let askedVersion = try await iq(bob, "<iq type='get' id='bv' to='m21@localhost/a'><query xmlns='jabber:iq:version'/></iq>", id: "bv")
        XCTAssertEqual(errorCondition(askedVersion), "service-unavailable")
        bob.send("<presence><status>bob is busy</status></presence>")
        // The same broadcast reaches the session without a list; only then does the marker go out.
        _ = try await expect(aliceOther, "Bob's presence where no list applies") { $0.name == "presence" && $0.child("status")?.text == "bob is busy" }
        carol.send(chat(to: "m21@localhost/a", body: "after bob's presence"))
        let afterPresence = try await expect(alice, "presence or marker") {
            ($0.name == "presence" && $0.child("status")?.text == "bob is busy") || $0.child("body")?.text == "after bob's presence"
        }
        XCTAssertEqual(afterPresence.name, "message", "Bob's presence was kept from the session whose list denies it")

        // Reading lists back.
        let names = try await iq(alice, "<iq type='get' id='g1'><query xmlns='jabber:iq:privacy'/></iq>", id: "g1")
        XCTAssertEqual(names.child("query")?.child("active")?[attribute: "name"], "noBob")
        XCTAssertEqual(names.child("query")?.elements.filter { $0.name == "list" }.map { $0[attribute: "name"] }, ["noBob"])
        let list = try await iq(alice, "<iq type='get' id='g2'><query xmlns='jabber:iq:privacy'><list name='noBob'/></query></iq>", id: "g2")
        XCTAssertEqual(list.child("query")?.child("list")?.child("item")?[attribute: "value"], "m22@localhost")
        let missing = try await iq(alice, "<iq type='get' id='g3'><query xmlns='jabber:iq:privacy'><list name='nope'/></query></iq>", id: "g3")
        XCTAssertEqual(errorCondition(missing), "item-not-found")
        let invalid = try await privacy(alice, "<list name='bad'><item action='deny' order='1'/><item action='deny' order='1'/></list>", id: "l3")
        XCTAssertEqual(errorCondition(invalid), "bad-request")

        // A list in use elsewhere cannot go; a default list in use by another session cannot change.
        _ = try await privacy(aliceOther, "<active name='noBob'/>", id: "l4")
        let inUse = try await privacy(alice, "<list name='noBob'/>", id: "l5")
        XCTAssertEqual(errorCondition(inUse), "conflict")
        _ = try await privacy(aliceOther, "<active/>", id: "l6")
        let busyDefault = try await privacy(alice, "<default name='noBob'/>", id: "l7")
        XCTAssertEqual(errorCondition(busyDefault), "conflict", "the other session uses the default list")

        // Invisible to a roster group, for presence only.
        _ = try await iq(alice, "<iq type='set' id='r1'><query xmlns='jabber:iq:roster'><item jid='m22@localhost'><group>Work</group></item></query></iq>", id: "r1")
        _ = try await privacy(alice, "<list name='hideFromWork'><item type='group' value='Work' action='deny' order='1'><presence-out/></item></list>", id: "l8")
        _ = try await privacy(alice, "<active name='hideFromWork'/>", id: "l9")
        alice.send("<presence><status>hidden from work</status></presence>")
        aliceOther.send("<presence><status>visible</status></presence>")
        let seen = try await expect(bob, "Alice's presences") { $0.name == "presence" && ["hidden from work", "visible"].contains($0.child("status")?.text ?? "") }
        XCTAssertEqual(seen.child("status")?.text, "visible", "the presence from the hiding session never arrived")
        // Outbound: a rule for every kind also stops messages to the contact.
        _ = try await privacy(alice, "<list name='cutCarol'><item type='jid' value='m23@localhost' action='deny' order='1'/></list>", id: "l10")
        _ = try await privacy(alice, "<active name='cutCarol'/>", id: "l11")
        alice.send(chat(to: "m23@localhost", body: "you will not get this"))
        let outbound = try await expect(alice, "outbound refusal") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(errorCondition(outbound), "not-acceptable")

        // The XEP-0191 blocklist is the list "Blocked contacts", editable from either side.
        _ = try await iq(alice, "<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='m24@localhost'/></block></iq>", id: "b1")
        let withBlocked = try await iq(alice, "<iq type='get' id='g4'><query xmlns='jabber:iq:privacy'/></iq>", id: "g4")
        XCTAssertTrue(withBlocked.child("query")?.elements.contains { $0[attribute: "name"] == "Blocked contacts" } ?? false, withBlocked.serialized())
        let blockedList = try await iq(alice, "<iq type='get' id='g5'><query xmlns='jabber:iq:privacy'><list name='Blocked contacts'/></query></iq>", id: "g5")
        XCTAssertEqual(blockedList.child("query")?.child("list")?.elements.map { $0[attribute: "value"] }, ["m24@localhost"])
        let edited = try await privacy(alice, """
            <list name='Blocked contacts'><item type='jid' value='m24@localhost' action='deny' order='1'/>\
            <item type='jid' value='m25@localhost' action='deny' order='2'/></list>
            """, id: "l12")
        XCTAssertEqual(edited[attribute: "type"], "result", edited.serialized())
        let blocklist = try await iq(alice, "<iq type='get' id='b2'><blocklist xmlns='urn:xmpp:blocking'/></iq>", id: "b2")
        XCTAssertEqual(Set(blocklist.child("blocklist")?.elements.compactMap { $0[attribute: "jid"] } ?? []), ["m24@localhost", "m25@localhost"])
        let dave = try await login(25, resource: "d")
        dave.send(chat(to: "m21@localhost/a", body: "blocked through privacy"))
        let daveRefused = try await expect(dave, "refusal") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(errorCondition(daveRefused), "service-unavailable")
        let notABlock = try await privacy(alice, "<list name='Blocked contacts'><item type='group' value='Work' action='deny' order='1'/></list>", id: "l13")
        XCTAssertEqual(errorCondition(notABlock), "not-acceptable")
        for client in [alice, aliceOther, bob, carol, dave] { await client.close() }
    }

    // MARK: Offline

    func testOfflineMessagesAreStampedDeliveredOnceAndLimited() async throws {
        let sender = try await login(1)
        try await Task.sleep(for: .milliseconds(100))
        for index in 1...3 { sender.send(chat(to: "m2@localhost", body: "while you were out \(index)")) }
        sender.send("<message to='m2@localhost' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>")
        sender.send(chat(to: "m2@localhost", body: "one too many"))
        let full = try await expect(sender, "quota error") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(errorCondition(full), "resource-constraint")
        XCTAssertEqual(full.child("body")?.text, "one too many")

        let recipient = try await login(2, presence: false)
        try await Task.sleep(for: .milliseconds(200))
        recipient.send("<presence/>")
        for index in 1...3 {
            let stored = try await message(recipient, body: "while you were out \(index)")
            XCTAssertEqual(stored[attribute: "from"]?.hasPrefix("m1@localhost/"), true)
            XCTAssertNotNil(stored.child("delay", namespace: "urn:xmpp:delay")?[attribute: "stamp"], "XEP-0203 delay")
        }
        await recipient.close()
        // Delivered once only.
        let again = try await login(2, presence: true)
        try await Task.sleep(for: .milliseconds(300))
        again.send("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
        let next = try await expect(again, "anything") { $0.name == "message" || $0[attribute: "id"] == "p" }
        XCTAssertEqual(next.name, "iq", "no offline message is delivered twice")
        await again.close()
        await sender.close()
    }

    // MARK: Blocking

    func testBlockedContactsGetNothingNotEvenPresence() async throws {
        let a = try await login(3, resource: "a")
        let b = try await login(4, resource: "b")
        try await befriend(a, "m3@localhost", b, "m4@localhost")
        let list = try await iq(a, "<iq type='get' id='bl1'><blocklist xmlns='urn:xmpp:blocking'/></iq>", id: "bl1")
        XCTAssertEqual(list.child("blocklist")?.elements.count, 0)

        _ = try await iq(a, "<iq type='set' id='bl2'><block xmlns='urn:xmpp:blocking'><item jid='m4@localhost'/></block></iq>", id: "bl2")
        _ = try await expect(a, "block push") { $0.name == "iq" && $0[attribute: "type"] == "set" && $0.child("block") != nil }
        _ = try await expect(b, "a goes unavailable for b") { $0.name == "presence" && $0[attribute: "type"] == "unavailable" && ($0[attribute: "from"] ?? "").hasPrefix("m3@localhost") }

        b.send(chat(to: "m3@localhost/a", body: "let me in"))
        let refused = try await expect(b, "error from a") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(errorCondition(refused), "service-unavailable")
        a.send(chat(to: "m4@localhost", body: "to the blocked"))
        let outbound = try await expect(a, "outbound refusal") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(errorCondition(outbound), "not-acceptable")
        XCTAssertNotNil(outbound.child("error")?.child("blocked", namespace: "urn:xmpp:blocking:errors"), "XEP-0191 §3.5: \(outbound.serialized())")
        a.send("<presence><status>secret</status></presence>")
        b.send("<iq type='get' id='b-ping'><ping xmlns='urn:xmpp:ping'/></iq>")
        let afterPresence = try await expect(b, "next stanza") {
            ($0.name == "presence" && $0.child("status")?.text == "secret") || $0[attribute: "id"] == "b-ping"
        }
        XCTAssertEqual(afterPresence.name, "iq", "no presence from the blocker reaches the blocked")

        let blocklist = try await iq(a, "<iq type='get' id='bl3'><blocklist xmlns='urn:xmpp:blocking'/></iq>", id: "bl3")
        XCTAssertEqual(blocklist.child("blocklist")?.elements.map { $0[attribute: "jid"] }, ["m4@localhost"])
        _ = try await iq(a, "<iq type='set' id='bl4'><unblock xmlns='urn:xmpp:blocking'/></iq>", id: "bl4")
        b.send(chat(to: "m3@localhost/a", body: "unblocked now"))
        _ = try await message(a, body: "unblocked now")
        let empty = try await iq(a, "<iq type='set' id='bl5'><block xmlns='urn:xmpp:blocking'/></iq>", id: "bl5")
        XCTAssertEqual(errorCondition(empty), "bad-request")
        await a.close()
        await b.close()
    }

    // MARK: Private XML and vCard

    func testPrivateXMLStorage() async throws {
        let a = try await login(5)
        let set = try await iq(a, "<iq type='set' id='px1'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'><theme>dark &amp; calm</theme></prefs></query></iq>", id: "px1")
        XCTAssertEqual(set[attribute: "type"], "result")
        let get = try await iq(a, "<iq type='get' id='px2'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query></iq>", id: "px2")
        XCTAssertEqual(get.child("query")?.child("prefs")?.child("theme")?.text, "dark & calm")
        let reserved = try await iq(a, "<iq type='set' id='px3'><query xmlns='jabber:iq:private'><x xmlns='jabber:client'/></query></iq>", id: "px3")
        XCTAssertEqual(errorCondition(reserved), "bad-request")
        let b = try await login(6)
        let foreign = try await iq(b, "<iq type='get' id='px4' to='m5@localhost'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query></iq>", id: "px4")
        XCTAssertEqual(errorCondition(foreign), "forbidden")
        await a.close()
        await b.close()
    }

    func testVCardAndAvatarHashInPresence() async throws {
        let a = try await login(7, resource: "a")
        let b = try await login(8, resource: "b")
        try await befriend(a, "m7@localhost", b, "m8@localhost")
        let photo = Data("not really a png".utf8).base64EncodedString()
        let set = try await iq(a, "<iq type='set' id='vc1'><vCard xmlns='vcard-temp'><FN>Seven</FN><PHOTO><TYPE>image/png</TYPE><BINVAL>\(photo)</BINVAL></PHOTO></vCard></iq>", id: "vc1")
        XCTAssertEqual(set[attribute: "type"], "result")
        let fetched = try await iq(b, "<iq type='get' id='vc2' to='m7@localhost'><vCard xmlns='vcard-temp'/></iq>", id: "vc2")
        XCTAssertEqual(fetched.child("vCard")?.child("FN")?.text, "Seven")
        let forbidden = try await iq(b, "<iq type='set' id='vc3' to='m7@localhost'><vCard xmlns='vcard-temp'><FN>Evil</FN></vCard></iq>", id: "vc3")
        XCTAssertEqual(errorCondition(forbidden), "forbidden")

        a.send("<presence><status>with avatar</status></presence>")
        let presence = try await expect(b, "presence with hash") { $0.name == "presence" && $0.child("status")?.text == "with avatar" }
        XCTAssertEqual(presence.child("x", namespace: "vcard-temp:x:update")?.child("photo")?.text.count, 40, "a SHA-1 in hex")
        let empty = try await iq(b, "<iq type='get' id='vc4' to='m19@localhost'><vCard xmlns='vcard-temp'/></iq>", id: "vc4")
        XCTAssertEqual(empty.child("vCard")?.elements.count, 0, "an account without a vCard has an empty one")
        await a.close()
        await b.close()
    }

    // MARK: Last activity

    func testLastActivity() async throws {
        let a = try await login(9, resource: "a")
        let b = try await login(10, resource: "b")
        try await befriend(a, "m9@localhost", b, "m10@localhost")
        let online = try await iq(b, "<iq type='get' id='l1' to='m9@localhost'><query xmlns='jabber:iq:last'/></iq>", id: "l1")
        XCTAssertEqual(online.child("query")?[attribute: "seconds"], "0")
        a.send("<presence type='unavailable'><status>gone fishing</status></presence>")
        await a.close()
        try await Task.sleep(for: .milliseconds(300))
        let offline = try await iq(b, "<iq type='get' id='l2' to='m9@localhost'><query xmlns='jabber:iq:last'/></iq>", id: "l2")
        XCTAssertNotNil(offline.child("query")?[attribute: "seconds"].flatMap { Int($0) })
        XCTAssertEqual(offline.child("query")?.text, "gone fishing")
        let stranger = try await login(11)
        let refused = try await iq(stranger, "<iq type='get' id='l3' to='m9@localhost'><query xmlns='jabber:iq:last'/></iq>", id: "l3")
        XCTAssertEqual(errorCondition(refused), "forbidden")
        let uptime = try await iq(stranger, "<iq type='get' id='l4' to='localhost'><query xmlns='jabber:iq:last'/></iq>", id: "l4")
        XCTAssertNotNil(uptime.child("query")?[attribute: "seconds"].flatMap { Int($0) })
        await b.close()
        await stranger.close()
    }

    // MARK: Carbons

    func testCarbonsCopySentAndReceivedMessages() async throws {
        let phone = try await login(12, resource: "phone")
        let laptop = try await login(12, resource: "laptop")
        let friend = try await login(13, resource: "f")
        for client in [phone, laptop] {
            let enabled = try await iq(client, "<iq type='set' id='c1'><enable xmlns='urn:xmpp:carbons:2'/></iq>", id: "c1")
            XCTAssertEqual(enabled[attribute: "type"], "result")
        }
        friend.send(chat(to: "m12@localhost/phone", body: "to the phone"))
        _ = try await message(phone, body: "to the phone")
        let received = try await expect(laptop, "received carbon") { $0.child("received", namespace: "urn:xmpp:carbons:2") != nil }
        XCTAssertEqual(received[attribute: "from"], "m12@localhost")
        XCTAssertEqual(received.child("received")?.child("forwarded")?.child("message")?.child("body")?.text, "to the phone")

        laptop.send(chat(to: "m13@localhost", body: "from the laptop"))
        _ = try await message(friend, body: "from the laptop")
        let sent = try await expect(phone, "sent carbon") { $0.child("sent", namespace: "urn:xmpp:carbons:2") != nil }
        XCTAssertEqual(sent.child("sent")?.child("forwarded")?.child("message")?[attribute: "to"], "m13@localhost")

        laptop.send(chat(to: "m13@localhost", body: "private one", extra: "<private xmlns='urn:xmpp:carbons:2'/>"))
        _ = try await message(friend, body: "private one")
        phone.send("<iq type='get' id='probe'><ping xmlns='urn:xmpp:ping'/></iq>")
        let next = try await expect(phone, "next") { $0.child("sent", namespace: "urn:xmpp:carbons:2") != nil || $0[attribute: "id"] == "probe" }
        XCTAssertEqual(next.name, "iq", "private messages are not copied")
        for client in [phone, laptop, friend] { await client.close() }
    }

    // MARK: Client state indication

    func testInactiveClientsGetPresenceAndChatStatesLaterAndMessagesAtOnce() async throws {
        let watcher = try await login(16, resource: "w")
        let friend = try await login(17, resource: "f")
        try await befriend(watcher, "m16@localhost", friend, "m17@localhost")
        watcher.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        try await Task.sleep(for: .milliseconds(100))
        friend.send("<presence><status>one</status></presence>")
        friend.send("<presence><status>two</status></presence>")
        friend.send("<message to='m16@localhost/w' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
        // Presence broadcasts run on the sender's queue: let them arrive (and be held) first.
        try await Task.sleep(for: .milliseconds(300))
        watcher.send("<iq type='get' id='quiet'><ping xmlns='urn:xmpp:ping'/></iq>")
        let first = try await expect(watcher, "anything") {
            $0[attribute: "id"] == "quiet" || $0.child("status") != nil || $0.child("composing") != nil
        }
        XCTAssertEqual(first.name, "iq", "presence and chat states are held while inactive")

        friend.send(chat(to: "m16@localhost/w", body: "wake up"))
        let released = try await expect(watcher, "held presence") { $0.name == "presence" && $0.child("status") != nil }
        XCTAssertEqual(released.child("status")?.text, "two", "only the newest presence per sender is kept")
        _ = try await expect(watcher, "held chat state") { $0.child("composing") != nil }
        _ = try await message(watcher, body: "wake up")

        friend.send("<presence><status>three</status></presence>")
        watcher.send("<active xmlns='urn:xmpp:csi:0'/>")
        let afterActive = try await expect(watcher, "presence after active") { $0.child("status")?.text == "three" }
        XCTAssertEqual(afterActive.name, "presence")
        await watcher.close()
        await friend.close()
    }

    func testCSIFeatureIsAdvertisedAfterAuthentication() async throws {
        let client = try await TestClient.connect(port: Self.server.directTLSPort, domain: "localhost", tls: .direct)
        try await client.openStream()
        XCTAssertNotNil(client.lastFeatures?.child("register", namespace: "http://jabber.org/features/iq-register"))
        XCTAssertNil(client.lastFeatures?.child("csi"))
        try await client.authenticate(username: "m18", password: "pw18", mechanism: "SCRAM-SHA-256")
        XCTAssertNotNil(client.lastFeatures?.child("csi", namespace: "urn:xmpp:csi:0"))
        await client.close()
    }

    // MARK: In-band registration

    func testInBandRegistrationIsRateLimitedPerAddress() async throws {
        let client = try await TestClient.connect(port: Self.server.directTLSPort, domain: "localhost", tls: .direct)
        try await client.openStream()
        let form = try await iq(client, "<iq type='get' id='reg1'><query xmlns='jabber:iq:register'/></iq>", id: "reg1")
        XCTAssertNotNil(form.child("query")?.child("password"))
        let short = try await iq(client, "<iq type='set' id='reg2'><query xmlns='jabber:iq:register'><username>newbie</username><password>abc</password></query></iq>", id: "reg2")
        XCTAssertEqual(errorCondition(short), "not-acceptable")
        let taken = try await iq(client, "<iq type='set' id='reg3'><query xmlns='jabber:iq:register'><username>m1</username><password>longenough</password></query></iq>", id: "reg3")
        XCTAssertEqual(errorCondition(taken), "conflict")
        let created = try await iq(client, "<iq type='set' id='reg4'><query xmlns='jabber:iq:register'><username>newbie</username><password>longenough</password></query></iq>", id: "reg4")
        XCTAssertEqual(created[attribute: "type"], "result")
        let tooSoon = try await iq(client, "<iq type='set' id='reg5'><query xmlns='jabber:iq:register'><username>newbie2</username><password>longenough</password></query></iq>", id: "reg5")
        XCTAssertEqual(errorCondition(tooSoon), "resource-constraint")
        // Other IQs before authentication get nothing.
        let other = try await iq(client, "<iq type='get' id='reg6' to='localhost'><query xmlns='jabber:iq:version'/></iq>", id: "reg6")
        XCTAssertEqual(errorCondition(other), "service-unavailable")
        try await client.authenticate(username: "newbie", password: "longenough", mechanism: "SCRAM-SHA-256")
        _ = try await client.bind(resource: "r")
        let changed = try await iq(client, "<iq type='set' id='pw'><query xmlns='jabber:iq:register'><username>newbie</username><password>evenlonger</password></query></iq>", id: "pw")
        XCTAssertEqual(changed[attribute: "type"], "result")
        await client.close()
        let again = try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "newbie", password: "evenlonger")
        let secondSession = try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "newbie", password: "evenlonger")
        // Removing the account (XEP-0077 §3.2): a result, then every stream of the account ends.
        let removed = try await iq(again, "<iq type='set' id='rm'><query xmlns='jabber:iq:register'><remove/></query></iq>", id: "rm")
        XCTAssertEqual(removed[attribute: "type"], "result")
        let first = try await again.expectStreamError()
        XCTAssertEqual(first, "not-authorized")
        let second = try await secondSession.expectStreamError()
        XCTAssertEqual(second, "not-authorized")
        do {
            _ = try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "newbie", password: "evenlonger")
            XCTFail("a removed account can still log in")
        } catch TestClientError.authenticationFailed(let condition) {
            XCTAssertEqual(condition, "not-authorized")
        }
    }

    // MARK: Delivery rules

    func testHeadlinesReachEveryResourceAndNegativePriorityGetsNoBareMessages() async throws {
        let high = try await login(19, resource: "high", presence: false)
        let low = try await login(19, resource: "low", presence: false)
        let hidden = try await login(19, resource: "hidden", presence: false)
        high.send("<presence><priority>5</priority></presence>")
        low.send("<presence><priority>1</priority></presence>")
        hidden.send("<presence><priority>-1</priority></presence>")
        let sender = try await login(20)
        try await Task.sleep(for: .milliseconds(200))
        sender.send("<message to='m19@localhost' type='headline'><body>news</body></message>")
        _ = try await message(high, body: "news")
        _ = try await message(low, body: "news")
        sender.send(chat(to: "m19@localhost", body: "chat for the top"))
        _ = try await message(high, body: "chat for the top")
        hidden.send("<iq type='get' id='h'><ping xmlns='urn:xmpp:ping'/></iq>")
        let next = try await expect(hidden, "next") { $0.name == "message" || $0[attribute: "id"] == "h" }
        XCTAssertEqual(next.name, "iq", "a negative-priority resource gets nothing sent to the bare JID")
        for client in [high, low, hidden, sender] { await client.close() }
    }

    func testDeletingAnAccountDeletesItsData() async throws {
        let a = try await login(14)
        _ = try await iq(a, "<iq type='set' id='v'><vCard xmlns='vcard-temp'><FN>Fourteen</FN></vCard></iq>", id: "v")
        await a.close()
        XCTAssertEqual(try Self.server.ctl(["unregister", "m14", "localhost"]).0, 0)
        XCTAssertEqual(try Self.server.ctl(["register", "m14", "localhost", "pw14"]).0, 0)
        let b = try await login(15)
        let vcard = try await iq(b, "<iq type='get' id='v2' to='m14@localhost'><vCard xmlns='vcard-temp'/></iq>", id: "v2")
        XCTAssertEqual(vcard.child("vCard")?.elements.count, 0, "a re-created account starts empty")
        await b.close()
    }
}

