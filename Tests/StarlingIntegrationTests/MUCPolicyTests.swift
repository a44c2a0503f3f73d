import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Room policy as operators write it: the Lua examples shipped in examples/lua, the spam filter and rate
/// limit plugins on groupchat, and a Swift plugin reloaded while its rooms stay up.
final class MUCPolicyTests: XCTestCase {
    static let users = (1...5).map { ("q\($0)", "pw\($0)") }

    private func login(_ server: ServerProcess, _ number: Int, domain: String = "localhost") async throws -> TestClient {
        try await TestClient.login(port: server.directTLSPort, domain: domain, tls: .direct,
                                   username: "q\(number)", password: "pw\(number)", resource: "r")
    }

    private func plugin(_ variable: String) throws -> String {
        guard let path = ProcessInfo.processInfo.environment[variable] else {
            throw XCTSkip("\(variable) is not set: scripts/test builds the plugins and sets it")
        }
        return path
    }

    private static let baseModules = """
      disco: {}
      ping: {}
      roster: {}
      presence: {}
      muc: { message_rate: 1000, message_burst: 1000 }
    """

    /// Whether `client` got a message from the room with `body` before an answer to a ping it sends now
    /// (the ping's answer comes after anything the room sent it earlier).
    private func received(_ client: TestClient, body: String) async throws -> Bool {
        let id = UUID().uuidString
        client.send("<iq type='get' to='localhost' id='\(id)'><ping xmlns='urn:xmpp:ping'/></iq>")
        let next = try await client.expect("'\(body)' or the ping") { $0[attribute: "id"] == id || $0.child("body")?.text == body }
        return next.name == "message"
    }

    func testTheShippedLuaRoomPolicies() async throws {
        let newcomers = try LuaHooksTests.example("muc_newcomers.lua")
        XCTAssertTrue(newcomers.contains("local wait = 30"), "the example's wait, which the test shortens")
        let server = try ServerProcess(extraConfig: "modules:\n" + Self.baseModules + """

          lua:
            scripts: [hooks/muc_creators.lua, hooks/muc_room_names.lua, hooks/muc_badwords.lua, hooks/muc_newcomers.lua]
        """, users: Self.users, files: [
            "hooks/muc_creators.lua": try LuaHooksTests.example("muc_creators.lua"),
            "hooks/muc_room_names.lua": try LuaHooksTests.example("muc_room_names.lua"),
            "hooks/muc_badwords.lua": try LuaHooksTests.example("muc_badwords.lua"),
            "hooks/muc_newcomers.lua": newcomers.replacingOccurrences(of: "local wait = 30", with: "local wait = 1"),
        ])
        defer { XCTAssertEqual(server.stop(), 0) }
        let (registered, output) = try server.ctl(["register", "q1", "example.test", "pw1"])
        XCTAssertEqual(registered, 0, output)

        // Only accounts of localhost create rooms; an example.test user may not.
        let visitor = try await login(server, 1, domain: "example.test")
        let notCreator = try await MUC.refusedJoin(visitor, "visitors-room", nick: "Visitor")
        XCTAssertEqual(notCreator, "not-allowed")
        // Room names follow the pattern.
        let owner = try await login(server, 1)
        let badName = try await MUC.refusedJoin(owner, "bad_name", nick: "Owner")
        XCTAssertEqual(badName, "not-acceptable")

        try await MUC.createInstantRoom(owner, "pirates", nick: "Captain")
        let sailor = try await login(server, 2)
        let bystander = try await login(server, 3)
        // Newcomers enter as visitors (the owner is exempt), and may not speak yet.
        let joined = try await MUC.join(sailor, "pirates", nick: "Sailor")
        XCTAssertEqual(MUC.item(joined.own)?[attribute: "role"], "visitor")
        _ = try await MUC.join(bystander, "pirates", nick: "Bystander")
        MUC.groupchat(sailor, "pirates", "ahoy", id: "early")
        let early = try await sailor.expect("too early") { $0[attribute: "id"] == "early" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(early), "forbidden")
        XCTAssertTrue(early.child("error")?.child("text")?.text.hasPrefix("new here") ?? false)
        // Once the wait is over, the first message gives voice (everyone sees it) and goes through.
        try await Task.sleep(for: .seconds(1.2))
        MUC.groupchat(sailor, "pirates", "ahoy again")
        let voiced = try await bystander.expect("Sailor's voice") {
            $0[attribute: "from"] == "pirates@\(MUC.service)/Sailor" && MUC.item($0)?[attribute: "role"] == "participant"
        }
        XCTAssertEqual(voiced.name, "presence")
        _ = try await MUC.message(bystander, from: "pirates@\(MUC.service)/Sailor", body: "ahoy again")

        // This room's bad word is refused twice with a count, and the third time the sender is kicked.
        for strike in 1...2 {
            MUC.groupchat(sailor, "pirates", "you landlubber", id: "bad\(strike)")
            let refused = try await sailor.expect("strike \(strike)") { $0[attribute: "id"] == "bad\(strike)" && $0[attribute: "type"] == "error" }
            XCTAssertEqual(MUC.errorCondition(refused), "policy-violation")
            XCTAssertEqual(refused.child("error")?.child("text")?.text, "mind your language (\(strike) of 3)")
        }
        MUC.groupchat(sailor, "pirates", "LANDLUBBER!", id: "bad3")
        let kicked = try await MUC.presence(sailor, from: "pirates@\(MUC.service)/Sailor", type: "unavailable")
        XCTAssertEqual(MUC.statuses(kicked), [110, 307])
        XCTAssertEqual(MUC.item(kicked)?.child("reason")?.text, "repeated bad language")
        let seen = try await MUC.presence(bystander, from: "pirates@\(MUC.service)/Sailor", type: "unavailable")
        XCTAssertEqual(MUC.statuses(seen), [307])
        let leaked = try await received(bystander, body: "you landlubber")
        XCTAssertFalse(leaked, "refused messages never reach the room")
        // The owner's words are checked too, but a clean room goes on.
        MUC.groupchat(owner, "pirates", "fair winds")
        _ = try await MUC.message(bystander, from: "pirates@\(MUC.service)/Captain", body: "fair winds")
    }

    func testSpamFilterAndRateLimitPluginsApplyToGroupchat() async throws {
        let server = try ServerProcess(extraConfig: """
        plugins:
          spam_filter: \(try plugin("STARLING_TEST_SPAM_PLUGIN"))
          rate_limits: \(try plugin("STARLING_TEST_PLUGIN"))
        modules:
        \(Self.baseModules)
          spam_filter: { keywords: [casino] }
          rate_limits: { rate: 0.1, burst: 12 }
        """, users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let owner = try await login(server, 1)
        let spammer = try await login(server, 2)
        let reader = try await login(server, 3)
        try await MUC.createInstantRoom(owner, "lounge", nick: "Owner")
        _ = try await MUC.join(spammer, "lounge", nick: "Spammer")
        _ = try await MUC.join(reader, "lounge", nick: "Reader")

        // Spam is refused to its sender, once, and nobody in the room sees it.
        MUC.groupchat(spammer, "lounge", "best casino in town", id: "spam")
        let refused = try await spammer.expect("spam refused") { $0[attribute: "id"] == "spam" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(refused), "policy-violation")
        let spamSeen = try await received(reader, body: "best casino in town")
        XCTAssertFalse(spamSeen)

        // A flood from one occupant runs out of its session's bucket; the room and the others carry on.
        for index in 1...20 { MUC.groupchat(spammer, "lounge", "flood \(index)", id: "flood\(index)") }
        let limited = try await spammer.expect("flood refused") { ($0[attribute: "id"] ?? "").hasPrefix("flood") && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(limited), "policy-violation")
        MUC.groupchat(owner, "lounge", "still fine here")
        _ = try await MUC.message(reader, from: "lounge@\(MUC.service)/Owner", body: "still fine here")
    }

    func testARoomPolicyPluginReloadsWhileItsRoomsStayUp() async throws {
        let server = try ServerProcess(extraConfig: """
        plugins:
          room_quota: \(try plugin("STARLING_TEST_ROOM_QUOTA_PLUGIN"))
        modules:
        \(Self.baseModules)
          room_quota: { max_rooms: 1 }
        """, users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let owner = try await login(server, 1)
        let guest = try await login(server, 2)
        try await MUC.createInstantRoom(owner, "first", nick: "Owner")
        _ = try await MUC.join(guest, "first", nick: "Guest")
        owner.send(MUC.joinStanza("second", nick: "Owner"))
        let refused = try await owner.expect("quota") { $0[attribute: "from"] == "second@\(MUC.service)/Owner" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(refused), "policy-violation")
        XCTAssertEqual(refused.child("error")?.child("text")?.text, "you own 1 rooms already; the limit is 1")

        let (status, output) = try server.ctl(["reload-module", "room_quota"])
        XCTAssertEqual(status, 0, output)
        // The room and its occupants are where they were.
        MUC.groupchat(guest, "first", "after the reload")
        _ = try await MUC.message(owner, from: "first@\(MUC.service)/Guest", body: "after the reload")
        // And the new build still applies the cap (another user may create one).
        owner.send(MUC.joinStanza("third", nick: "Owner"))
        let again = try await owner.expect("quota again") { $0[attribute: "from"] == "third@\(MUC.service)/Owner" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(again), "policy-violation")
        try await MUC.createInstantRoom(guest, "guests", nick: "Guest")
    }
}
