import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// `acl:` and `access_rules:` on the real server: who may register, create rooms and log in, from which
/// networks, with which SASL mechanisms; users, patterns, networks and a Lua predicate as lists; and a
/// `reload-config` that changes the rules for the next request.
final class AccessRulesTests: XCTestCase {
    static func config(registerFrom: String, loginFrom: String) -> String {
        """
        auth:
          failure_delay: 0.2
          access: c2s
          mechanism_access: { PLAIN: from_elsewhere }
        acl:
          admins: { users: [boss@localhost] }
          loopback: { networks: [127.0.0.0/8, "::1/128"] }
          elsewhere: { networks: [10.0.0.0/8, "fd00::/8"] }
          bots: { regexp: ["bot-[0-9]+@localhost"] }
          vip: { lua: [vip] }
        access_rules:
          from_elsewhere:
            - allow: elsewhere
          register_here:
            - allow: \(registerFrom)
            - deny: all
          make_rooms:
            - allow: admins
            - allow: vip
          c2s:
            - deny: bots
            - allow: \(loginFrom)
        modules:
          disco: {}
          roster: {}
          presence: {}
          register: { allow_registration: true, access: register_here, min_interval: 0 }
          muc: { access_create: make_rooms }
          announce: { access: make_rooms }
          lua: { scripts: [acl.lua] }
        """
    }

    static let script = """
    starling.hook("access", function(subject)
      if subject.attr.list == "vip" and subject.attr.jid == "alice@localhost" then return "allow" end
    end)
    """

    func register(_ server: ServerProcess, _ username: String) async throws -> XMLElement {
        let client = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        try await client.openStream()
        let answer = try await client.iq("<iq type='set' id='r1'><query xmlns='jabber:iq:register'><username>\(username)</username><password>longenough</password></query></iq>", id: "r1")
        await client.close()
        return answer
    }

    func login(_ server: ServerProcess, _ user: String, _ password: String) async throws -> TestClient {
        try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: user, password: password, resource: "r")
    }

    func testRulesDecideRegistrationRoomCreationAndLoginAndReloadLive() async throws {
        let server = try ServerProcess(extraConfig: Self.config(registerFrom: "elsewhere", loginFrom: "loopback"),
                                       users: [("alice", "pw1"), ("bob", "pw2"), ("boss", "pw3"), ("bot-7", "pw4")],
                                       files: ["acl.lua": Self.script])
        defer { XCTAssertEqual(server.stop(), 0) }

        // Registration only from 10/8: refused here, on loopback.
        let refused = try await register(server, "newcomer")
        XCTAssertEqual(refused[attribute: "type"], "error")
        XCTAssertEqual(MUC.errorCondition(refused), "forbidden")

        // Logins: anyone from loopback but the bots (a pattern list); PLAIN is for 10/8 only.
        let probe = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        try await probe.openStream()
        XCTAssertTrue(probe.offeredMechanisms.contains("SCRAM-SHA-256"), "\(probe.offeredMechanisms)")
        XCTAssertFalse(probe.offeredMechanisms.contains("PLAIN"), "\(probe.offeredMechanisms)")
        await probe.close()
        do {
            _ = try await login(server, "bot-7", "pw4")
            XCTFail("a bot logged in")
        } catch {}
        let alice = try await login(server, "alice", "pw1")
        let bob = try await login(server, "bob", "pw2")
        let boss = try await login(server, "boss", "pw3")

        // Room creation: the admins list and the Lua predicate's vip may, bob may not.
        try await MUC.createInstantRoom(alice, "alices", nick: "alice")
        try await MUC.createInstantRoom(boss, "bosses", nick: "boss")
        let bobs = try await MUC.refusedJoin(bob, "bobs", nick: "bob")
        XCTAssertEqual(bobs, "not-allowed")

        // Announcements: the vip may, to every online session (as a headline from the host); bob may not.
        alice.send("<message to='localhost/announce/online' id='a1'><subject>News</subject><body>tea in the lobby</body></message>")
        for client in [alice, bob, boss] {
            let news = try await client.expect("the announcement") { $0.name == "message" && $0.child("body")?.text == "tea in the lobby" }
            XCTAssertEqual(news[attribute: "from"], "localhost")
            XCTAssertEqual(news[attribute: "type"], "headline")
            XCTAssertEqual(news.child("subject")?.text, "News")
        }
        bob.send("<message to='localhost/announce/online' id='b1'><body>spam</body></message>")
        let refusal = try await bob.expect("the refusal") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(MUC.errorCondition(refusal), "forbidden")

        // New rules, live: registration from loopback, logins only from 10/8.
        let original = try String(contentsOfFile: server.configPath, encoding: .utf8)
        let reversed = original.replacingOccurrences(of: Self.config(registerFrom: "elsewhere", loginFrom: "loopback"),
                                                     with: Self.config(registerFrom: "loopback", loginFrom: "elsewhere"))
        XCTAssertNotEqual(reversed, original)
        try reversed.write(toFile: server.configPath, atomically: true, encoding: .utf8)
        let (status, output) = try server.ctl(["reload-config"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("applied: access rules"), output)
        XCTAssertFalse(output.contains("needs a restart: auth"), output)
        let created = try await register(server, "newcomer")
        XCTAssertEqual(created[attribute: "type"], "result", created.serialized())
        do {
            _ = try await login(server, "newcomer", "longenough")
            XCTFail("logged in from loopback, which the rules no longer allow")
        } catch {}
        // Sessions already up stay up: the rules decide logins, not existing sessions.
        alice.send("<message to='bob@localhost/r' type='chat'><body>still here</body></message>")
        let message = try await bob.expect("alice's message") { $0.name == "message" }
        XCTAssertEqual(message.child("body")?.text, "still here")
        XCTAssertTrue((try String(contentsOfFile: server.errorLogPath, encoding: .utf8)).contains("login refused by the access rules"))

        // A rule naming a list that does not exist changes nothing and says where.
        let broken = reversed.replacingOccurrences(of: "- allow: admins", with: "- allow: admin")
        try broken.write(toFile: server.configPath, atomically: true, encoding: .utf8)
        let line = try XCTUnwrap(broken.components(separatedBy: "\n").firstIndex { $0.hasSuffix("- allow: admin") }) + 1
        let (badStatus, bad) = try server.ctl(["reload-config"])
        XCTAssertNotEqual(badStatus, 0)
        XCTAssertTrue(bad.contains("starling.yml:\(line): access_rules.make_rooms: no list 'admin' in acl"), bad)
        await alice.close()
        await bob.close()
        await boss.close()
    }
}
