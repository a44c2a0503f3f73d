import StarlingAPI
@testable import StarlingMUC
import StarlingStorage
import StarlingXML
import Synchronization
import XCTest

/// The room state machine on its own: stanzas in, actions out, with a clock the test sets and policy
/// hooks the test writes.
final class RoomTests: XCTestCase {
    /// Runs the hooks a test sets for a point, and records every point run.
    final class Hooks: HookRunner, @unchecked Sendable {
        var handlers: [String: (Any) -> HookResult] = [:]
        var ran: [String] = []

        func on<Event>(_ point: HookPoint<Event>, _ handler: @escaping (Event) -> HookResult) {
            handlers[point.name] = { handler($0 as! Event) }
        }

        func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult {
            ran.append(point.name)
            return handlers[point.name]?(event) ?? .pass
        }
    }

    let roomJID = JID("tea@conference.example")!
    let hooks = Hooks()

    private func room(_ configure: (inout MUCRoomOptions) -> Void = { _ in }) -> Room {
        var options = MUCRoomOptions()
        configure(&options)
        return Room(jid: roomJID, options: options, settings: RoomSettings(historySize: 3, messageRate: 1, messageBurst: 2), hooks: hooks,
                    affiliations: [JID("owner@example")!: MUCAffiliationRecord(affiliation: .owner)], salt: "salt")
    }

    private func input(_ xml: String, from: String, to nick: String? = nil) -> ComponentStanza {
        var stanza = XMLElement(name: "x")
        if let parsed = XMLFragmentParser.parse(xml) { stanza = parsed }
        stanza[attribute: "from"] = from
        let to = nick.map { try! roomJID.with(resource: $0) } ?? roomJID
        stanza[attribute: "to"] = to.description
        return ComponentStanza(stanza: stanza, from: JID(from)!, to: to)
    }

    private func join(_ room: Room, _ session: String, nick: String, history: String = "", now: Double = 1000) -> [XMLElement] {
        sent(room.handle(input("<presence><x xmlns='http://jabber.org/protocol/muc'>\(history)</x></presence>", from: session, to: nick), now: now))
    }

    /// What the room sends, broadcasts expanded to one addressed copy per session.
    private func sent(_ actions: [RoomAction]) -> [XMLElement] {
        actions.flatMap { action -> [XMLElement] in
            switch action {
            case .send(let stanza): return [stanza]
            case .broadcast(let stanza, let sessions):
                return sessions.map { session in
                    var copy = stanza
                    copy[attribute: "to"] = session.description
                    return copy
                }
            default: return []
            }
        }
    }

    private func statuses(_ stanza: XMLElement) -> [Int] {
        stanza.child("x", namespace: MUCNamespace.user)?.elements.filter { $0.name == "status" }.compactMap { $0[attribute: "code"].flatMap(Int.init) } ?? []
    }

    func testAJoinSendsTheRosterThenSelfThenHistoryThenSubject() {
        let room = room()
        _ = join(room, "owner@example/a", nick: "Owner")
        _ = sent(room.handle(input("<message type='groupchat'><body>old</body></message>", from: "owner@example/a"), now: 1001))
        let out = join(room, "bob@example/b", nick: "Bob", now: 1002)
        // To the owner: Bob's presence, with his real JID (the owner moderates).
        XCTAssertEqual(out[0][attribute: "to"], "owner@example/a")
        XCTAssertEqual(out[0].child("x", namespace: MUCNamespace.user)?.child("item")?[attribute: "jid"], "bob@example/b")
        // To Bob, in this order: the owner, himself (110), the history (stamped), the subject.
        let toBob = out.filter { $0[attribute: "to"] == "bob@example/b" }
        XCTAssertEqual(toBob.map(\.name), ["presence", "presence", "message", "message"])
        XCTAssertEqual(toBob[0][attribute: "from"], "tea@conference.example/Owner")
        XCTAssertNil(toBob[0].child("x", namespace: MUCNamespace.user)?.child("item")?[attribute: "jid"])
        XCTAssertEqual(statuses(toBob[1]), [110])
        XCTAssertEqual(toBob[2].child("body")?.text, "old")
        XCTAssertEqual(toBob[2].child("delay", namespace: MUCNamespace.delay)?[attribute: "stamp"], "1970-01-01T00:16:41Z")
        XCTAssertNotNil(toBob[3].child("subject"))
    }

    func testHistoryBySecondsSinceAndCharacters() {
        let room = room()
        _ = join(room, "owner@example/a", nick: "Owner")
        for (index, time) in [10.0, 20, 30, 40].enumerated() {
            _ = room.handle(input("<message type='groupchat'><body>m\(index)</body></message>", from: "owner@example/a"), now: 1000 + time)
        }
        func history(_ request: String) -> [String] {
            let bob = JID("bob@example/\(UUID().uuidString.prefix(6))")!
            let out = join(room, bob.description, nick: bob.resourcepart!, history: request, now: 1045)
            _ = room.handle(input("<presence type='unavailable'/>", from: bob.description, to: bob.resourcepart!), now: 1045)
            return out.filter { $0.name == "message" && $0.child("body") != nil && $0[attribute: "to"] == bob.description }.compactMap { $0.child("body")?.text }
        }
        XCTAssertEqual(history(""), ["m1", "m2", "m3"], "the room keeps its last three")
        XCTAssertEqual(history("<history seconds='20'/>"), ["m2", "m3"])
        XCTAssertEqual(history("<history since='1970-01-01T00:17:10Z'/>"), ["m2", "m3"])
        XCTAssertEqual(history("<history maxstanzas='1'/>"), ["m3"])
        XCTAssertEqual(history("<history maxchars='0'/>"), [])
    }

    func testJoinHooksCanRefuseOrChangeTheRole() {
        let room = room()
        hooks.on(.mucJoin) { event in
            if event.occupant.nick == "Spammer" { return .reject(.notAllowed, text: "no") }
            event.grant.value.role = .visitor
            return .pass
        }
        let refused = join(room, "spam@example/x", nick: "Spammer")
        XCTAssertEqual(refused.first?[attribute: "type"], "error")
        XCTAssertNotNil(refused.first?.child("error")?.child("not-allowed"))
        XCTAssertEqual(refused.first?.child("error")?.child("text")?.text, "no")
        let out = join(room, "new@example/x", nick: "Newcomer")
        XCTAssertEqual(out.last { $0.name == "presence" }?.child("x", namespace: MUCNamespace.user)?.child("item")?[attribute: "role"], "visitor")
        let spoken = sent(room.handle(input("<message type='groupchat'><body>hi</body></message>", from: "new@example/x"), now: 1001))
        XCTAssertNotNil(spoken.first?.child("error")?.child("forbidden"), "a visitor may not speak")
    }

    func testMessageHooksCanKickAndGrantVoice() {
        let room = room { $0.moderated = true }
        _ = join(room, "owner@example/a", nick: "Owner")
        _ = join(room, "new@example/x", nick: "Newcomer")
        hooks.on(.mucGroupchatMessage) { event in
            if event.stanza.child("body")?.text == "bad" { event.kick.value = "language" }
            if event.stanza.child("body")?.text == "let me" { event.senderRole.value = .participant }
            return .pass
        }
        let voiced = sent(room.handle(input("<message type='groupchat'><body>let me</body></message>", from: "new@example/x"), now: 1001))
        XCTAssertTrue(voiced.contains { $0.name == "presence" && $0.child("x", namespace: MUCNamespace.user)?.child("item")?[attribute: "role"] == "participant" })
        XCTAssertTrue(voiced.contains { $0.name == "message" && $0.child("body")?.text == "let me" && $0[attribute: "to"] == "owner@example/a" })
        let kicked = sent(room.handle(input("<message type='groupchat'><body>bad</body></message>", from: "new@example/x"), now: 1002))
        XCTAssertFalse(kicked.contains { $0.name == "message" && $0.child("body")?.text == "bad" && $0[attribute: "type"] == "groupchat" })
        let removal = kicked.first { $0.name == "presence" && $0[attribute: "to"] == "new@example/x" }
        XCTAssertEqual(removal.map(statuses), [110, 307])
        XCTAssertNil(room.occupant(session: JID("new@example/x")!))
    }

    func testTheRateLimitRefillsWithTime() {
        let room = room()
        _ = join(room, "owner@example/a", nick: "Owner")
        func say(_ now: Double) -> Bool {
            !sent(room.handle(input("<message type='groupchat'><body>x</body></message>", from: "owner@example/a"), now: now)).contains { $0[attribute: "type"] == "error" }
        }
        XCTAssertTrue(say(1000))
        XCTAssertTrue(say(1000))
        XCTAssertFalse(say(1000), "a burst of two")
        XCTAssertTrue(say(1001), "one more a second later")
        XCTAssertFalse(say(1001))
    }

    func testPersistentRoomsEmitStoreWrites() {
        let room = room { $0.persistent = true }
        _ = join(room, "owner@example/a", nick: "Owner")
        let actions = room.handle(input("<iq type='set' id='1'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='m@example'/></query></iq>",
                                        from: "owner@example/a"), now: 1001)
        XCTAssertTrue(actions.contains { if case .store(.affiliation(let user, let record)) = $0 { return user == JID("m@example")! && record.affiliation == .member } else { return false } })
        let subject = room.handle(input("<message type='groupchat'><subject>new</subject></message>", from: "owner@example/a"), now: 1002)
        XCTAssertTrue(subject.contains { if case .store(.options(let stored)) = $0 { return stored.subject == "new" } else { return false } })
        // A temporary room stores nothing.
        let temporary = self.room()
        _ = join(temporary, "owner@example/a", nick: "Owner")
        let none = temporary.handle(input("<iq type='set' id='2'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='m@example'/></query></iq>",
                                          from: "owner@example/a"), now: 1001)
        XCTAssertFalse(none.contains { if case .store = $0 { return true } else { return false } })
    }

    func testNicknamesMustBeVisibleAndShort() {
        let room = room()
        let blank = join(room, "a@example/x", nick: "\u{3000}")
        XCTAssertNotNil(blank.first?.child("error")?.child("not-acceptable"))
        let long = join(room, "a@example/x", nick: String(repeating: "n", count: 65))
        XCTAssertNotNil(long.first?.child("error")?.child("not-acceptable"))
    }
}
