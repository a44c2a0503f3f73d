import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Multi-user chat (XEP-0045) on the real server, as users, occupants, moderators, admins and owners use
/// it: every flow and every error the issue lists.
final class MUCTests: XCTestCase {
    static let users = (1...12).map { ("u\($0)", "pw\($0)") }
    nonisolated(unsafe) static var server: ServerProcess!
    nonisolated(unsafe) static var startFailure: (any Error)?

    static let modules = """
    modules:
      disco: {}
      ping: {}
      roster: {}
      presence: {}
      muc: { history_size: 5, max_occupants: 50, message_rate: 1000, message_burst: 1000, admins: [u12@localhost] }
    """

    override class func setUp() {
        super.setUp()
        do { server = try ServerProcess(extraConfig: modules, users: users) } catch { startFailure = error }
    }

    override func setUpWithError() throws {
        if let failure = Self.startFailure { throw failure }
    }

    override class func tearDown() {
        startFailure = nil
        XCTAssertEqual(server?.stop() ?? 0, 0)
        server = nil
        super.tearDown()
    }

    private func login(_ number: Int, resource: String = "r") async throws -> TestClient {
        try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct,
                                   username: "u\(number)", password: "pw\(number)", resource: resource)
    }

    /// A room name of this test's own (tests share one server).
    private func roomName(_ function: String = #function) -> String {
        String(function.prefix { $0 != "(" }.lowercased().prefix(40))
    }

    // MARK: Discovery, creation, entering

    func testDiscoveryCreationAndEntering() async throws {
        let room = roomName()
        let owner = try await login(1)
        let bob = try await login(2)
        defer { Task { await owner.close(); await bob.close() } }

        // The host lists the service; the service says what it is.
        let items = try await owner.iq("<iq type='get' to='localhost' id='items'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", id: "items")
        XCTAssertTrue(items.child("query")?.elements.contains { $0[attribute: "jid"] == MUC.service } ?? false, items.serialized())
        let info = try await owner.iq("<iq type='get' to='\(MUC.service)' id='info'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "info")
        let identity = info.child("query")?.child("identity")
        XCTAssertEqual(identity?[attribute: "category"], "conference")
        XCTAssertEqual(identity?[attribute: "type"], "text")
        let serviceFeatures = info.child("query")?.elements.filter { $0.name == "feature" }.compactMap { $0[attribute: "var"] } ?? []
        XCTAssertTrue(serviceFeatures.contains(MUC.muc))
        XCTAssertTrue(serviceFeatures.contains("http://jabber.org/protocol/muc#stable_id"))

        // Creating: the creator is owner and moderator, status 201; the room is locked until configured.
        let created = try await MUC.join(owner, room, nick: "Owner")
        XCTAssertEqual(MUC.statuses(created.own), [110, 201])
        XCTAssertEqual(MUC.item(created.own)?[attribute: "affiliation"], "owner")
        XCTAssertEqual(MUC.item(created.own)?[attribute: "role"], "moderator")
        XCTAssertEqual(created.roster.count, 0)
        XCTAssertEqual(created.subject.child("subject")?.text, "", "an empty subject is still sent")
        let locked = try await MUC.refusedJoin(bob, room, nick: "Bob")
        XCTAssertEqual(locked, "item-not-found")

        // Accepting the defaults unlocks it.
        let instant = try await owner.iq("<iq type='set' to='\(room)@\(MUC.service)' id='instant'><query xmlns='\(MUC.owner)'><x xmlns='jabber:x:data' type='submit'/></query></iq>", id: "instant")
        XCTAssertEqual(instant[attribute: "type"], "result")

        // Bob enters: he gets the owner's presence first (no real JID: the room is semi-anonymous), then his own.
        let joined = try await MUC.join(bob, room, nick: "Bob")
        XCTAssertEqual(joined.roster.map { $0[attribute: "from"] }, ["\(room)@\(MUC.service)/Owner"])
        XCTAssertNil(MUC.item(joined.roster[0])?[attribute: "jid"], "participants do not see real JIDs in a semi-anonymous room")
        XCTAssertEqual(MUC.item(joined.own)?[attribute: "role"], "participant")
        XCTAssertEqual(MUC.item(joined.own)?[attribute: "affiliation"], "none")
        XCTAssertEqual(MUC.statuses(joined.own), [110])
        XCTAssertNotNil(joined.own.child("occupant-id", namespace: "urn:xmpp:occupant-id:0"))
        // The owner (a moderator) sees Bob's real JID.
        let bobSeen = try await MUC.presence(owner, from: "\(room)@\(MUC.service)/Bob")
        XCTAssertEqual(MUC.item(bobSeen)?[attribute: "jid"], "u2@localhost/r")

        // The room now shows up, with features for its kind.
        let listed = try await bob.iq("<iq type='get' to='\(MUC.service)' id='rooms'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", id: "rooms")
        XCTAssertTrue(listed.child("query")?.elements.contains { $0[attribute: "jid"] == "\(room)@\(MUC.service)" } ?? false, listed.serialized())
        let roomInfo = try await bob.iq("<iq type='get' to='\(room)@\(MUC.service)' id='roominfo'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "roominfo")
        let features = Set(roomInfo.child("query")?.elements.filter { $0.name == "feature" }.compactMap { $0[attribute: "var"] } ?? [])
        for feature in ["muc_public", "muc_open", "muc_unmoderated", "muc_temporary", "muc_semianonymous", "muc_unsecured", MUC.muc] {
            XCTAssertTrue(features.contains(feature), "\(feature) in \(features.sorted())")
        }
        let occupants = roomInfo.child("query")?.child("x", namespace: "jabber:x:data")?.elements.first { $0[attribute: "var"] == "muc#roominfo_occupants" }
        XCTAssertEqual(occupants?.child("value")?.text, "2")

        // A room that does not exist.
        let missing = try await bob.iq("<iq type='get' to='nosuchroom@\(MUC.service)' id='missing'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "missing")
        XCTAssertEqual(MUC.errorCondition(missing), "item-not-found")
    }

    func testMessagesHistorySubjectNickChangesAndLeaving() async throws {
        let room = roomName()
        let alice = try await login(1)
        let bob = try await login(2)
        let carol = try await login(3)
        defer { Task { await alice.close(); await bob.close(); await carol.close() } }
        try await MUC.createInstantRoom(alice, room, nick: "Alice")
        _ = try await MUC.join(bob, room, nick: "Bob")

        // A groupchat message reaches everyone, sender included, from the room, with the sender's id and
        // a stanza-id by the room.
        MUC.groupchat(bob, room, "hello room", id: "m1")
        for client in [alice, bob] {
            let message = try await MUC.message(client, from: "\(room)@\(MUC.service)/Bob", body: "hello room")
            XCTAssertEqual(message[attribute: "id"], "m1")
            XCTAssertEqual(message.child("stanza-id", namespace: "urn:xmpp:sid:0")?[attribute: "by"], "\(room)@\(MUC.service)")
        }
        // A participant may not change the subject by default; a moderator may.
        bob.send("<message to='\(room)@\(MUC.service)' type='groupchat' id='s1'><subject>Bob's topic</subject></message>")
        let refused = try await bob.expect("subject refusal") { $0[attribute: "id"] == "s1" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(refused), "forbidden")
        alice.send("<message to='\(room)@\(MUC.service)' type='groupchat'><subject>Today: tests</subject></message>")
        let subject = try await bob.expect("subject") { $0.child("subject")?.text == "Today: tests" }
        XCTAssertEqual(subject[attribute: "from"], "\(room)@\(MUC.service)/Alice")
        for index in 2...7 { MUC.groupchat(alice, room, "message \(index)") }
        _ = try await MUC.message(bob, from: "\(room)@\(MUC.service)/Alice", body: "message 7")

        // A newcomer gets the history (the last 5, the room's size), stamped, then the subject.
        let joined = try await MUC.join(carol, room, nick: "Carol")
        XCTAssertEqual(joined.history.compactMap { $0.child("body")?.text }, (3...7).map { "message \($0)" })
        XCTAssertTrue(joined.history.allSatisfy { $0.child("delay", namespace: "urn:xmpp:delay")?[attribute: "from"] == "\(room)@\(MUC.service)" })
        XCTAssertEqual(joined.subject.child("subject")?.text, "Today: tests")
        XCTAssertNotNil(joined.subject.child("delay", namespace: "urn:xmpp:delay"))
        XCTAssertEqual(Set(joined.roster.compactMap { $0[attribute: "from"] }), ["\(room)@\(MUC.service)/Alice", "\(room)@\(MUC.service)/Bob"])
        // History limits: none at all, or just the last two.
        await carol.close()
        let carol2 = try await login(3)
        defer { Task { await carol2.close() } }
        let none = try await MUC.join(carol2, room, nick: "Carol", history: "<history maxchars='0'/>")
        XCTAssertEqual(none.history.count, 0)
        carol2.send("<presence to='\(room)@\(MUC.service)/Carol' type='unavailable'/>")
        _ = try await MUC.presence(carol2, from: "\(room)@\(MUC.service)/Carol", type: "unavailable")
        let two = try await MUC.join(carol2, room, nick: "Carol", history: "<history maxstanzas='2'/>")
        XCTAssertEqual(two.history.compactMap { $0.child("body")?.text }, ["message 6", "message 7"])

        // Private messages between occupants go through the room.
        bob.send("<message to='\(room)@\(MUC.service)/Carol' type='chat' id='pm'><body>psst</body></message>")
        let pm = try await MUC.message(carol2, from: "\(room)@\(MUC.service)/Bob", body: "psst")
        XCTAssertNotNil(pm.child("x", namespace: MUC.user))
        bob.send("<message to='\(room)@\(MUC.service)/Nobody' type='chat' id='pm2'><body>hello?</body></message>")
        let nobody = try await bob.expect("pm error") { $0[attribute: "id"] == "pm2" }
        XCTAssertEqual(MUC.errorCondition(nobody), "item-not-found")

        // Nick change: everyone sees 303 with the new nick, then the new presence.
        bob.send("<presence to='\(room)@\(MUC.service)/Robert'/>")
        let gone = try await MUC.presence(alice, from: "\(room)@\(MUC.service)/Bob", type: "unavailable")
        XCTAssertEqual(MUC.statuses(gone), [303])
        XCTAssertEqual(MUC.item(gone)?[attribute: "nick"], "Robert")
        _ = try await MUC.presence(alice, from: "\(room)@\(MUC.service)/Robert")
        let ownGone = try await MUC.presence(bob, from: "\(room)@\(MUC.service)/Bob", type: "unavailable")
        XCTAssertEqual(MUC.statuses(ownGone), [110, 303])
        // A taken nick is refused.
        bob.send("<presence to='\(room)@\(MUC.service)/Alice' id='taken'/>")
        let conflict = try await bob.expect("nick conflict") { $0[attribute: "id"] == "taken" }
        XCTAssertEqual(MUC.errorCondition(conflict), "conflict")

        // Leaving: the leaver gets 110, the others the unavailable presence with role none.
        carol2.send("<presence to='\(room)@\(MUC.service)/Carol' type='unavailable'><status>bye</status></presence>")
        // (Alice saw Carol leave twice before, without a status: her first connection closed, then she left.)
        let left = try await alice.expect("Carol leaving with a status") {
            $0.name == "presence" && $0[attribute: "from"] == "\(room)@\(MUC.service)/Carol" && $0[attribute: "type"] == "unavailable"
                && $0.child("status") != nil
        }
        XCTAssertEqual(MUC.item(left)?[attribute: "role"], "none")
        XCTAssertEqual(left.child("status")?.text, "bye")
        // A non-occupant's groupchat message is refused.
        MUC.groupchat(carol2, room, "am I still here?", id: "outside")
        let outside = try await carol2.expect("refusal") { $0[attribute: "id"] == "outside" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(outside), "not-acceptable")
    }

    func testATemporaryRoomGoesAwayWithItsLastOccupantAndDisconnectsLeave() async throws {
        let room = roomName()
        let alice = try await login(1)
        var bob: TestClient? = try await login(2)
        defer { Task { await alice.close() } }
        try await MUC.createInstantRoom(alice, room, nick: "Alice")
        _ = try await MUC.join(bob!, room, nick: "Bob")
        // Bob's connection drops: the room sees him leave.
        await bob?.close()
        bob = nil
        let left = try await MUC.presence(alice, from: "\(room)@\(MUC.service)/Bob", type: "unavailable")
        XCTAssertEqual(MUC.item(left)?[attribute: "role"], "none")
        // Alice leaves: the room is gone.
        alice.send("<presence to='\(room)@\(MUC.service)/Alice' type='unavailable'/>")
        _ = try await MUC.presence(alice, from: "\(room)@\(MUC.service)/Alice", type: "unavailable")
        let info = try await alice.iq("<iq type='get' to='\(room)@\(MUC.service)' id='gone'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "gone")
        XCTAssertEqual(MUC.errorCondition(info), "item-not-found")
    }
}
