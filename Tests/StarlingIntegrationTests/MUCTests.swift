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

    // MARK: Errors on entering and speaking

    func testEveryRefusalXEP0045Lists() async throws {
        let room = roomName()
        let owner = try await login(1)
        let visitor = try await login(2)
        let stranger = try await login(3)
        let member = try await login(4)
        defer { Task { await owner.close(); await visitor.close(); await stranger.close(); await member.close() } }
        try await MUC.createInstantRoom(owner, room, nick: "Owner")

        // Nickname taken.
        let taken = try await MUC.refusedJoin(visitor, room, nick: "Owner")
        XCTAssertEqual(taken, "conflict")
        // A room without a nickname.
        visitor.send("<presence to='\(room)@\(MUC.service)' id='nonick'><x xmlns='\(MUC.muc)'/></presence>")
        let noNick = try await visitor.expect("no nick") { $0[attribute: "id"] == "nonick" }
        XCTAssertEqual(MUC.errorCondition(noNick), "jid-malformed")

        // Moderated: a newcomer is a visitor and may not speak.
        let moderated = try await MUC.configure(owner, room, ["moderatedroom": ["1"]])
        XCTAssertEqual(moderated[attribute: "type"], "result")
        let asVisitor = try await MUC.join(visitor, room, nick: "Visitor")
        XCTAssertEqual(MUC.item(asVisitor.own)?[attribute: "role"], "visitor")
        MUC.groupchat(visitor, room, "may I?", id: "voiceless")
        let voiceless = try await visitor.expect("refusal") { $0[attribute: "id"] == "voiceless" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(voiceless), "forbidden")
        // A voice request reaches the moderator as a form; approving it gives voice.
        visitor.send("""
        <message to='\(room)@\(MUC.service)'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field><field var='muc#role'><value>participant</value></field></x></message>
        """)
        let request = try await owner.expect("voice request") { $0.name == "message" && $0.child("x", namespace: "jabber:x:data") != nil }
        let nickField = request.child("x", namespace: "jabber:x:data")?.elements.first { $0[attribute: "var"] == "muc#roomnick" }
        XCTAssertEqual(nickField?.child("value")?.text, "Visitor")
        owner.send("""
        <message to='\(room)@\(MUC.service)'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field><field var='muc#role'><value>participant</value></field><field var='muc#roomnick'><value>Visitor</value></field><field var='muc#request_allow'><value>true</value></field></x></message>
        """)
        let voiced = try await visitor.expect("voice granted") {
            $0.name == "presence" && $0[attribute: "from"] == "\(room)@\(MUC.service)/Visitor" && MUC.item($0)?[attribute: "role"] == "participant"
        }
        XCTAssertTrue(MUC.statuses(voiced).contains(110))
        MUC.groupchat(visitor, room, "thank you")
        _ = try await MUC.message(owner, from: "\(room)@\(MUC.service)/Visitor", body: "thank you")

        // Password-protected: wrong or missing password.
        _ = try await MUC.configure(owner, room, ["moderatedroom": ["0"], "passwordprotectedroom": ["1"], "roomsecret": ["s3cret"]])
        let noPassword = try await MUC.refusedJoin(stranger, room, nick: "Stranger")
        XCTAssertEqual(noPassword, "not-authorized")
        let wrong = try await MUC.refusedJoin(stranger, room, nick: "Stranger", password: "guess")
        XCTAssertEqual(wrong, "not-authorized")
        let withPassword = try await MUC.join(stranger, room, nick: "Stranger", password: "s3cret")
        XCTAssertEqual(MUC.item(withPassword.own)?[attribute: "role"], "participant")
        stranger.send("<presence to='\(room)@\(MUC.service)/Stranger' type='unavailable'/>")
        _ = try await MUC.presence(stranger, from: "\(room)@\(MUC.service)/Stranger", type: "unavailable")
        // A passwordless password-protected room is refused.
        let blank = try await MUC.configure(owner, room, ["passwordprotectedroom": ["1"], "roomsecret": [""]])
        XCTAssertEqual(MUC.errorCondition(blank), "not-acceptable")
        _ = try await MUC.configure(owner, room, ["passwordprotectedroom": ["0"]])

        // Members-only: a member enters, a stranger may not; the room kicks the non-members it had (322).
        let memberAdded = try await MUC.admin(owner, room, "<item affiliation='member' jid='u4@localhost'/>")
        XCTAssertEqual(memberAdded[attribute: "type"], "result")
        _ = try await MUC.configure(owner, room, ["membersonly": ["1"]])
        let removed = try await MUC.presence(visitor, from: "\(room)@\(MUC.service)/Visitor", type: "unavailable")
        XCTAssertEqual(MUC.statuses(removed), [110, 322])
        let notMember = try await MUC.refusedJoin(stranger, room, nick: "Stranger")
        XCTAssertEqual(notMember, "registration-required")
        let asMember = try await MUC.join(member, room, nick: "Member")
        XCTAssertEqual(MUC.item(asMember.own)?[attribute: "affiliation"], "member")
        _ = try await MUC.configure(owner, room, ["membersonly": ["0"]])

        // Banned users may not enter (forbidden).
        let ban = try await MUC.admin(owner, room, "<item affiliation='outcast' jid='u3@localhost'><reason>spam</reason></item>")
        XCTAssertEqual(ban[attribute: "type"], "result")
        let banned = try await MUC.refusedJoin(stranger, room, nick: "Stranger")
        XCTAssertEqual(banned, "forbidden")

        // Full room: service-unavailable.
        _ = try await MUC.configure(owner, room, ["maxusers": ["2"]])
        let full = try await MUC.refusedJoin(visitor, room, nick: "Visitor")
        XCTAssertEqual(full, "service-unavailable")
    }

    // MARK: Moderation, administration, ownership

    func testKickBanVoiceAndTheListsOfAdminsAndOwners() async throws {
        let room = roomName()
        let owner = try await login(1)
        let moderator = try await login(2)
        let troll = try await login(3)
        let bystander = try await login(4)
        defer { Task { await owner.close(); await moderator.close(); await troll.close(); await bystander.close() } }
        try await MUC.createInstantRoom(owner, room, nick: "Owner")
        _ = try await MUC.configure(owner, room, ["whois": ["anyone"]])
        let nonAnonymous = try await MUC.join(moderator, room, nick: "Mod")
        XCTAssertTrue(MUC.statuses(nonAnonymous.own).contains(100), "a non-anonymous room says so")
        XCTAssertEqual(MUC.item(nonAnonymous.roster[0])?[attribute: "jid"], "u1@localhost/r", "everyone sees real JIDs")
        _ = try await MUC.join(troll, room, nick: "Troll")
        _ = try await MUC.join(bystander, room, nick: "Bystander")

        // A participant may not kick.
        let notModerator = try await MUC.admin(troll, room, "<item nick='Bystander' role='none'/>")
        XCTAssertEqual(MUC.errorCondition(notModerator), "forbidden")
        // The owner makes Mod a moderator (role), then an admin (affiliation) who kicks the troll.
        let promoted = try await MUC.admin(owner, room, "<item nick='Mod' role='moderator'/>")
        XCTAssertEqual(promoted[attribute: "type"], "result")
        let admin = try await MUC.admin(owner, room, "<item affiliation='admin' jid='u2@localhost'/>")
        XCTAssertEqual(admin[attribute: "type"], "result")
        let modSeen = try await bystander.expect("Mod becomes admin") {
            $0[attribute: "from"] == "\(room)@\(MUC.service)/Mod" && MUC.item($0)?[attribute: "affiliation"] == "admin"
        }
        XCTAssertEqual(MUC.item(modSeen)?[attribute: "role"], "moderator")
        // An admin may not act on the owner.
        let onOwner = try await MUC.admin(moderator, room, "<item nick='Owner' role='none'/>")
        XCTAssertEqual(MUC.errorCondition(onOwner), "not-allowed")
        let kick = try await MUC.admin(moderator, room, "<item nick='Troll' role='none'><reason>behave</reason></item>")
        XCTAssertEqual(kick[attribute: "type"], "result")
        let kicked = try await MUC.presence(troll, from: "\(room)@\(MUC.service)/Troll", type: "unavailable")
        XCTAssertEqual(MUC.statuses(kicked), [110, 307])
        XCTAssertEqual(MUC.item(kicked)?.child("reason")?.text, "behave")
        XCTAssertEqual(MUC.item(kicked)?.child("actor")?[attribute: "nick"], "Mod")
        let seenKicked = try await MUC.presence(bystander, from: "\(room)@\(MUC.service)/Troll", type: "unavailable")
        XCTAssertEqual(MUC.statuses(seenKicked), [307])

        // The troll comes back and is banned (301); the ban list shows it with the reason.
        _ = try await MUC.join(troll, room, nick: "Troll")
        let ban = try await MUC.admin(moderator, room, "<item affiliation='outcast' jid='u3@localhost'><reason>again</reason></item>")
        XCTAssertEqual(ban[attribute: "type"], "result")
        let banned = try await troll.expect("ban") {
            $0[attribute: "from"] == "\(room)@\(MUC.service)/Troll" && $0[attribute: "type"] == "unavailable" && MUC.statuses($0).contains(301)
        }
        XCTAssertEqual(MUC.statuses(banned), [110, 301])
        let banList = try await moderator.iq("<iq type='get' to='\(room)@\(MUC.service)' id='bans'><query xmlns='\(MUC.admin)'><item affiliation='outcast'/></query></iq>", id: "bans")
        let banItem = banList.child("query")?.child("item")
        XCTAssertEqual(banItem?[attribute: "jid"], "u3@localhost")
        XCTAssertEqual(banItem?.child("reason")?.text, "again")
        // Banning oneself, and anything without admin rights, is refused.
        let selfBan = try await MUC.admin(moderator, room, "<item affiliation='outcast' jid='u2@localhost'/>")
        XCTAssertEqual(MUC.errorCondition(selfBan), "conflict")
        let byParticipant = try await MUC.admin(bystander, room, "<item affiliation='outcast' jid='u2@localhost'/>")
        XCTAssertEqual(MUC.errorCondition(byParticipant), "forbidden")
        // Only owners change admins.
        let adminByAdmin = try await MUC.admin(moderator, room, "<item affiliation='admin' jid='u4@localhost'/>")
        XCTAssertEqual(MUC.errorCondition(adminByAdmin), "forbidden")
        // Role and affiliation in one item is a bad request.
        let both = try await MUC.admin(owner, room, "<item nick='Bystander' role='visitor' affiliation='member' jid='u4@localhost'/>")
        XCTAssertEqual(MUC.errorCondition(both), "bad-request")

        // Voice: revoke and grant; the role list shows it.
        let revoke = try await MUC.admin(moderator, room, "<item nick='Bystander' role='visitor'/>")
        XCTAssertEqual(revoke[attribute: "type"], "result")
        let visitors = try await moderator.iq("<iq type='get' to='\(room)@\(MUC.service)' id='visitors'><query xmlns='\(MUC.admin)'><item role='visitor'/></query></iq>", id: "visitors")
        XCTAssertEqual(visitors.child("query")?.child("item")?[attribute: "nick"], "Bystander")
        MUC.groupchat(bystander, room, "muted?", id: "muted")
        let muted = try await bystander.expect("muted") { $0[attribute: "id"] == "muted" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(muted), "forbidden")
        _ = try await MUC.admin(moderator, room, "<item nick='Bystander' role='participant'/>")

        // Owners: the last owner cannot step down; a second owner makes it possible.
        let lastOwner = try await MUC.admin(owner, room, "<item affiliation='admin' jid='u1@localhost'/>")
        XCTAssertEqual(MUC.errorCondition(lastOwner), "conflict")
        _ = try await MUC.admin(owner, room, "<item affiliation='owner' jid='u4@localhost'/>")
        let owners = try await owner.iq("<iq type='get' to='\(room)@\(MUC.service)' id='owners'><query xmlns='\(MUC.admin)'><item affiliation='owner'/></query></iq>", id: "owners")
        XCTAssertEqual(Set(owners.child("query")?.elements.compactMap { $0[attribute: "jid"] } ?? []), ["u1@localhost", "u4@localhost"])
        let adminsByNonOwner = try await troll.iq("<iq type='get' to='\(room)@\(MUC.service)' id='admins'><query xmlns='\(MUC.admin)'><item affiliation='admin'/></query></iq>", id: "admins")
        XCTAssertEqual(MUC.errorCondition(adminsByNonOwner), "forbidden")
    }

    func testConfigurationFormAndDestruction() async throws {
        let room = roomName()
        let owner = try await login(1)
        let guest = try await login(2)
        defer { Task { await owner.close(); await guest.close() } }
        try await MUC.createInstantRoom(owner, room, nick: "Owner")
        _ = try await MUC.join(guest, room, nick: "Guest")

        // The form carries the standard fields with the current values.
        let form = try await owner.iq("<iq type='get' to='\(room)@\(MUC.service)' id='form'><query xmlns='\(MUC.owner)'/></iq>", id: "form")
        let fields = form.child("query")?.child("x", namespace: "jabber:x:data")?.elements.filter { $0.name == "field" } ?? []
        let values = Dictionary(fields.compactMap { field in field[attribute: "var"].map { ($0, field.child("value")?.text ?? "") } }) { $1 }
        XCTAssertEqual(values["FORM_TYPE"], "http://jabber.org/protocol/muc#roomconfig")
        for field in ["roomname", "roomdesc", "persistentroom", "publicroom", "membersonly", "moderatedroom", "passwordprotectedroom",
                      "roomsecret", "whois", "maxusers", "changesubject", "allowinvites", "allowpm", "presencebroadcast", "getmemberlist",
                      "enablelogging", "roomadmins", "roomowners"] {
            XCTAssertNotNil(values["muc#roomconfig_\(field)"], "\(field) in the form")
        }
        XCTAssertEqual(values["muc#roomconfig_publicroom"], "1")
        XCTAssertEqual(values["muc#roomconfig_whois"], "moderators")
        let notOwner = try await guest.iq("<iq type='get' to='\(room)@\(MUC.service)' id='form2'><query xmlns='\(MUC.owner)'/></iq>", id: "form2")
        XCTAssertEqual(MUC.errorCondition(notOwner), "forbidden")

        // A change is announced to occupants: logging on is 170, other changes 104.
        _ = try await MUC.configure(owner, room, ["roomname": ["Tea Room"], "enablelogging": ["1"]])
        let logging = try await guest.expect("config change") { $0.name == "message" && MUC.statuses($0).contains(170) }
        XCTAssertEqual(logging[attribute: "from"], "\(room)@\(MUC.service)")
        _ = try await MUC.configure(owner, room, ["roomdesc": ["For tea"]])
        _ = try await guest.expect("config change 104") { $0.name == "message" && MUC.statuses($0).contains(104) }
        let info = try await guest.iq("<iq type='get' to='\(room)@\(MUC.service)' id='info'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "info")
        XCTAssertEqual(info.child("query")?.child("identity")?[attribute: "name"], "Tea Room")
        // A bad value is refused and changes nothing.
        let bad = try await MUC.configure(owner, room, ["whois": ["everybody"]])
        XCTAssertEqual(MUC.errorCondition(bad), "not-acceptable")

        // Destroying: only the owner; occupants learn the alternate venue and the reason.
        let byGuest = try await guest.iq("<iq type='set' to='\(room)@\(MUC.service)' id='d1'><query xmlns='\(MUC.owner)'><destroy/></query></iq>", id: "d1")
        XCTAssertEqual(MUC.errorCondition(byGuest), "forbidden")
        let destroyed = try await owner.iq("""
        <iq type='set' to='\(room)@\(MUC.service)' id='d2'><query xmlns='\(MUC.owner)'><destroy jid='elsewhere@\(MUC.service)'><reason>moving</reason></destroy></query></iq>
        """, id: "d2")
        XCTAssertEqual(destroyed[attribute: "type"], "result")
        let gone = try await MUC.presence(guest, from: "\(room)@\(MUC.service)/Guest", type: "unavailable")
        let destroy = gone.child("x", namespace: MUC.user)?.child("destroy", namespace: MUC.user)
        XCTAssertEqual(destroy?[attribute: "jid"], "elsewhere@\(MUC.service)")
        XCTAssertEqual(destroy?.child("reason")?.text, "moving")
        let after = try await guest.iq("<iq type='get' to='\(room)@\(MUC.service)' id='after'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "after")
        XCTAssertEqual(MUC.errorCondition(after), "item-not-found")
    }

    func testReservedRoomCancelledAndServiceAdmins() async throws {
        let room = roomName()
        let creator = try await login(1)
        let admin = try await login(12)
        defer { Task { await creator.close(); await admin.close() } }
        // The creator asks for the form of the new (locked) room, then cancels: the room is destroyed.
        _ = try await MUC.join(creator, room, nick: "Creator")
        let form = try await creator.iq("<iq type='get' to='\(room)@\(MUC.service)' id='f'><query xmlns='\(MUC.owner)'/></iq>", id: "f")
        XCTAssertNotNil(form.child("query")?.child("x", namespace: "jabber:x:data"))
        let cancel = try await creator.iq("<iq type='set' to='\(room)@\(MUC.service)' id='c'><query xmlns='\(MUC.owner)'><x xmlns='jabber:x:data' type='cancel'/></query></iq>", id: "c")
        XCTAssertEqual(cancel[attribute: "type"], "result")
        _ = try await MUC.presence(creator, from: "\(room)@\(MUC.service)/Creator", type: "unavailable")
        let gone = try await creator.iq("<iq type='get' to='\(room)@\(MUC.service)' id='g'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "g")
        XCTAssertEqual(MUC.errorCondition(gone), "item-not-found")

        // A service admin (u12, from the config) owns every room: it enters a locked room and configures it.
        _ = try await MUC.join(creator, room, nick: "Creator")
        let entered = try await MUC.join(admin, room, nick: "Admin")
        XCTAssertEqual(MUC.item(entered.own)?[attribute: "affiliation"], "owner")
        let configured = try await MUC.configure(admin, room, ["roomname": ["Admin's room"]])
        XCTAssertEqual(configured[attribute: "type"], "result")
    }

    // MARK: Invitations, registration, private IQs

    func testInvitationsRegistrationSelfPingAndRelayedIQs() async throws {
        let room = roomName()
        let owner = try await login(1)
        let friend = try await login(2)
        let other = try await login(3)
        defer { Task { await owner.close(); await friend.close(); await other.close() } }
        try await MUC.createInstantRoom(owner, room, nick: "Owner")
        _ = try await MUC.configure(owner, room, ["membersonly": ["1"], "passwordprotectedroom": ["1"], "roomsecret": ["tea"]])

        // A mediated invitation to a members-only room makes the invitee a member and carries the password.
        owner.send("<message to='\(room)@\(MUC.service)' id='inv'><x xmlns='\(MUC.user)'><invite to='u2@localhost'><reason>join us</reason></invite></x></message>")
        let invitation = try await friend.expect("invitation") { $0.name == "message" && $0.child("x", namespace: MUC.user)?.child("invite", namespace: MUC.user) != nil }
        XCTAssertEqual(invitation[attribute: "from"], "\(room)@\(MUC.service)")
        let invite = invitation.child("x", namespace: MUC.user)?.child("invite", namespace: MUC.user)
        XCTAssertEqual(invite?[attribute: "from"], "\(room)@\(MUC.service)/Owner", "a semi-anonymous room names the inviter by nickname")
        XCTAssertEqual(invite?.child("reason")?.text, "join us")
        XCTAssertEqual(invitation.child("x", namespace: MUC.user)?.child("password", namespace: MUC.user)?.text, "tea")
        let asMember = try await MUC.join(friend, room, nick: "Friend", password: "tea")
        XCTAssertEqual(MUC.item(asMember.own)?[attribute: "affiliation"], "member")
        // The invitee declines another invitation: the inviter hears it.
        owner.send("<message to='\(room)@\(MUC.service)'><x xmlns='\(MUC.user)'><invite to='u3@localhost'/></x></message>")
        _ = try await other.expect("second invitation") { $0.child("x", namespace: MUC.user)?.child("invite", namespace: MUC.user) != nil }
        other.send("<message to='\(room)@\(MUC.service)'><x xmlns='\(MUC.user)'><decline to='u1@localhost'><reason>busy</reason></decline></x></message>")
        let declined = try await owner.expect("decline") { $0.child("x", namespace: MUC.user)?.child("decline", namespace: MUC.user) != nil }
        XCTAssertEqual(declined.child("x", namespace: MUC.user)?.child("decline", namespace: MUC.user)?[attribute: "from"], "u3@localhost")
        XCTAssertEqual(declined.child("x", namespace: MUC.user)?.child("decline", namespace: MUC.user)?.child("reason")?.text, "busy")
        // A member may not invite to a members-only room unless the room allows it.
        friend.send("<message to='\(room)@\(MUC.service)' id='inv2'><x xmlns='\(MUC.user)'><invite to='u5@localhost'/></x></message>")
        let memberInvite = try await friend.expect("refused invitation") { $0[attribute: "id"] == "inv2" }
        XCTAssertEqual(MUC.errorCondition(memberInvite), "forbidden")
        // A direct invitation (XEP-0249) is a plain message between users: it passes.
        owner.send("<message to='u3@localhost'><x xmlns='jabber:x:conference' jid='\(room)@\(MUC.service)' password='tea' reason='come'/></message>")
        let direct = try await other.expect("direct invitation") { $0.child("x", namespace: "jabber:x:conference") != nil }
        XCTAssertEqual(direct.child("x", namespace: "jabber:x:conference")?[attribute: "jid"], "\(room)@\(MUC.service)")

        // Registration: an open room makes a registrant a member with a reserved nickname.
        _ = try await MUC.configure(owner, room, ["membersonly": ["0"], "passwordprotectedroom": ["0"]])
        let regForm = try await other.iq("<iq type='get' to='\(room)@\(MUC.service)' id='rf'><query xmlns='jabber:iq:register'/></iq>", id: "rf")
        XCTAssertNotNil(regForm.child("query")?.child("x", namespace: "jabber:x:data"))
        let register = try await other.iq("""
        <iq type='set' to='\(room)@\(MUC.service)' id='reg'><query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field><field var='muc#register_roomnick'><value>Reserved</value></field></x></query></iq>
        """, id: "reg")
        XCTAssertEqual(register[attribute: "type"], "result")
        let registered = try await other.iq("<iq type='get' to='\(room)@\(MUC.service)' id='rf2'><query xmlns='jabber:iq:register'/></iq>", id: "rf2")
        XCTAssertNotNil(registered.child("query")?.child("registered"))
        XCTAssertEqual(registered.child("query")?.child("username")?.text, "Reserved")
        let reservedNick = try await other.iq("<iq type='get' to='\(room)@\(MUC.service)' id='rn'><query xmlns='http://jabber.org/protocol/disco#info' node='x-roomuser-item'/></iq>", id: "rn")
        XCTAssertEqual(reservedNick.child("query")?.child("identity")?[attribute: "name"], "Reserved")
        // Someone else may not take a reserved nickname.
        let takeReserved = try await MUC.refusedJoin(friend, room, nick: "Reserved")
        XCTAssertEqual(takeReserved, "conflict")

        // Self-ping (XEP-0410): answered by the service for occupants, not-acceptable for others.
        friend.send("<iq type='get' to='\(room)@\(MUC.service)/Friend' id='sp'><ping xmlns='urn:xmpp:ping'/></iq>")
        let pong = try await friend.expect("self-ping") { $0[attribute: "id"] == "sp" }
        XCTAssertEqual(pong[attribute: "type"], "result")
        let notJoined = try await other.iq("<iq type='get' to='\(room)@\(MUC.service)/Other' id='sp2'><ping xmlns='urn:xmpp:ping'/></iq>", id: "sp2")
        XCTAssertEqual(MUC.errorCondition(notJoined), "not-acceptable")
        // An IQ to another occupant is relayed without real JIDs, and so is the answer.
        owner.send("<iq type='get' to='\(room)@\(MUC.service)/Friend' id='ver'><query xmlns='jabber:iq:version'/></iq>")
        let relayed = try await friend.expect("relayed IQ") { $0.name == "iq" && $0.child("query", namespace: "jabber:iq:version") != nil }
        XCTAssertEqual(relayed[attribute: "from"], "\(room)@\(MUC.service)/Owner")
        friend.send("<iq type='result' to='\(relayed[attribute: "from"]!)' id='\(relayed[attribute: "id"]!)'><query xmlns='jabber:iq:version'><name>test</name></query></iq>")
        let answer = try await owner.expect("relayed answer") { $0[attribute: "id"] == "ver" }
        XCTAssertEqual(answer[attribute: "from"], "\(room)@\(MUC.service)/Friend")
        XCTAssertEqual(answer.child("query")?.child("name")?.text, "test")
    }

    func testTwoSessionsShareANickname() async throws {
        let room = roomName()
        let phone = try await login(1, resource: "phone")
        let laptop = try await login(1, resource: "laptop")
        let friend = try await login(2)
        defer { Task { await phone.close(); await laptop.close(); await friend.close() } }
        try await MUC.createInstantRoom(phone, room, nick: "Me")
        _ = try await MUC.join(friend, room, nick: "Friend")
        // The same user joins with the same nickname from another device: one occupant, two sessions.
        let second = try await MUC.join(laptop, room, nick: "Me")
        XCTAssertEqual(second.roster.map { $0[attribute: "from"] }, ["\(room)@\(MUC.service)/Friend"])
        MUC.groupchat(friend, room, "to both devices")
        _ = try await MUC.message(phone, from: "\(room)@\(MUC.service)/Friend", body: "to both devices")
        _ = try await MUC.message(laptop, from: "\(room)@\(MUC.service)/Friend", body: "to both devices")
        friend.send("<message to='\(room)@\(MUC.service)/Me' type='chat'><body>private to both</body></message>")
        _ = try await MUC.message(phone, from: "\(room)@\(MUC.service)/Friend", body: "private to both")
        _ = try await MUC.message(laptop, from: "\(room)@\(MUC.service)/Friend", body: "private to both")
        // One device leaves: the other stays, and the room does not see the occupant go.
        laptop.send("<presence to='\(room)@\(MUC.service)/Me' type='unavailable'/>")
        _ = try await MUC.presence(laptop, from: "\(room)@\(MUC.service)/Me", type: "unavailable")
        MUC.groupchat(phone, room, "still here")
        _ = try await MUC.message(friend, from: "\(room)@\(MUC.service)/Me", body: "still here")
        friend.send("<iq type='get' to='\(room)@\(MUC.service)' id='sync'><ping xmlns='urn:xmpp:ping'/></iq>")
        let next = try await friend.expect("ping or Me leaving") {
            $0[attribute: "id"] == "sync" || ($0[attribute: "from"] == "\(room)@\(MUC.service)/Me" && $0[attribute: "type"] == "unavailable")
        }
        XCTAssertEqual(next.name, "iq", "the occupant did not leave")
    }

    // MARK: An independent client

    func testSlixmppJoinsTalksKicksAndConfigures() async throws {
        let (status, output) = try ServerProcess.slixmpp([
            "muc", "--port", "\(Self.server.starttlsPort)", "--tls", "starttls", "--room", "slixmpp@\(MUC.service)",
            "--jid-a", "u10@localhost", "--password-a", "pw10", "--jid-b", "u11@localhost", "--password-b", "pw11",
        ])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("OK"), output)
    }
}
