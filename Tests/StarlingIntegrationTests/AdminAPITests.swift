import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The admin API (`type: admin` listener) against the real server: every call with the token and its
/// effect seen by XMPP clients, refusals without it, and every exchange checked against
/// docs/admin-api.yaml by an OpenAPI validator (Tests/Interop/openapi_check.py).
final class AdminAPITests: XCTestCase {
    static let token = "test-admin-token-0123456789-abcdefghijkl"
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Calls the API and records each exchange for the OpenAPI check.
    final class API {
        let base: String
        var exchanges: [[String: Any]] = []

        init(port: Int) { base = "http://127.0.0.1:\(port)/api/v1" }

        struct Answer {
            let status: Int
            let json: Any?
            var object: [String: Any] { json as? [String: Any] ?? [:] }
        }

        @discardableResult
        func call(_ method: String, _ path: String, query: String = "", body: Any? = nil, rawBody: String? = nil,
                  token: String? = AdminAPITests.token) async throws -> Answer {
            var request = URLRequest(url: URL(string: base + path + (query.isEmpty ? "" : "?" + query))!)
            request.httpMethod = method
            if let token { request.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization") }
            if let body {
                request.httpBody = try JSONSerialization.data(withJSONObject: body)
                request.setValue("application/json", forHTTPHeaderField: "Content-Type")
            } else if let rawBody {
                request.httpBody = Data(rawBody.utf8)
            }
            let (data, response) = try await URLSession.shared.data(for: request)
            let http = try XCTUnwrap(response as? HTTPURLResponse)
            let json = data.isEmpty ? nil : try? JSONSerialization.jsonObject(with: data)
            if !data.isEmpty { XCTAssertNotNil(json, "\(method) \(path): not JSON: \(String(decoding: data, as: UTF8.self))") }
            var exchange: [String: Any] = ["method": method, "path": "/api/v1" + path, "status": http.statusCode]
            exchange["request"] = body ?? rawBody.map { _ in NSNull() }
            // A deliberately malformed body is recorded, but not held against the document.
            if rawBody != nil { exchange["request_valid"] = false }
            if let json { exchange["response"] = json }
            if let challenge = http.value(forHTTPHeaderField: "WWW-Authenticate") { exchange["www_authenticate"] = challenge }
            exchanges.append(exchange)
            return Answer(status: http.statusCode, json: json)
        }

        /// Asks for the account until `count` offline messages are stored for it (a few seconds at most).
        func waitForOfflineMessages(_ count: Int, of user: String) async throws {
            for _ in 0..<200 {
                if try await call("GET", "/hosts/localhost/users/\(user)").object["offline_messages"] as? Int == count { return }
                try await Task.sleep(for: .milliseconds(25))
            }
            XCTFail("\(user) never had \(count) offline message(s)")
        }

        /// A call that must be answered with `status`.
        func expect(_ status: Int, _ method: String, _ path: String, query: String = "", body: Any? = nil, rawBody: String? = nil,
                    token: String? = AdminAPITests.token, file: StaticString = #filePath, line: UInt = #line) async throws {
            let answer = try await call(method, path, query: query, body: body, rawBody: rawBody, token: token)
            XCTAssertEqual(answer.status, status, "\(method) \(path): \(answer.object)", file: file, line: line)
        }
    }

    func testEveryCallWorksOnTheRealServerAndMatchesTheOpenAPIDocument() async throws {
        // A plugin, so that reloading a module can succeed too.
        guard let plugin = ProcessInfo.processInfo.environment["STARLING_TEST_PLUGIN"] else {
            throw XCTSkip("STARLING_TEST_PLUGIN is not set: scripts/test builds the plugins and sets it")
        }
        let server = try ServerProcess(
            extraConfig: "plugins:\n  rate_limits: \(plugin)\nmodules:\n  disco: {}\n  roster: {}\n  presence: {}\n  offline: {}\n  mam: {}\n  muc: {}\n"
                + "  rate_limits: { connection_rate: 1000, connection_burst: 1000 }\n",
            users: [("a1", "pw1"), ("b1", "pw2")],
            files: ["admin.token": Self.token + "\n"],
            extraListeners: ["{ type: admin, port: 0, token_file: admin.token }"])
        defer { XCTAssertEqual(server.stop(), 0) }
        XCTAssertNotEqual(server.adminPort, 0)
        let api = API(port: server.adminPort)

        // Without the token, or with another, nothing is done.
        var answer = try await api.call("GET", "/status", token: nil)
        XCTAssertEqual(answer.status, 401)
        answer = try await api.call("POST", "/hosts/localhost/users", body: ["username": "intruder", "password": "x"], token: String(repeating: "x", count: 40))
        XCTAssertEqual(answer.status, 401)
        answer = try await api.call("GET", "/status")
        XCTAssertEqual(answer.status, 200)
        XCTAssertEqual(answer.object["sessions"] as? Int, 0)
        XCTAssertEqual(answer.object["hosts"] as? [String], ["localhost", "example.test"])

        // Accounts: created, listed, logged in with.
        answer = try await api.call("POST", "/hosts/localhost/users", body: ["username": "newbie", "password": "np"])
        XCTAssertEqual(answer.status, 201)
        XCTAssertEqual(answer.object["jid"] as? String, "newbie@localhost")
        try await api.expect(409, "POST", "/hosts/localhost/users", body: ["username": "newbie", "password": "np"])
        try await api.expect(404, "POST", "/hosts/nowhere.test/users", body: ["username": "x", "password": "y"])
        try await api.expect(400, "POST", "/hosts/localhost/users", rawBody: "{\"username\": 1}")
        answer = try await api.call("GET", "/hosts/localhost/users")
        XCTAssertEqual(answer.object["users"] as? [String], ["a1", "b1", "newbie"])
        try await api.expect(401, "GET", "/hosts/localhost/users", token: nil)

        let newbie = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "newbie", password: "np", resource: "r")
        answer = try await api.call("GET", "/sessions")
        XCTAssertEqual((answer.object["sessions"] as? [[String: Any]])?.compactMap { $0["jid"] as? String }, ["newbie@localhost/r"])
        answer = try await api.call("GET", "/sessions", query: "host=example.test")
        XCTAssertEqual((answer.object["sessions"] as? [[String: Any]])?.count, 0)
        try await api.expect(404, "GET", "/sessions", query: "host=nowhere.test")
        answer = try await api.call("GET", "/hosts/localhost/stats")
        XCTAssertEqual(answer.object["sessions"] as? Int, 1)
        XCTAssertEqual(answer.object["online_users"] as? Int, 1)
        XCTAssertEqual(answer.object["registered_users"] as? Int, 3)

        // A message to one user, a headline to everyone online.
        answer = try await api.call("POST", "/messages", body: ["to": "newbie@localhost", "body": "welcome aboard"])
        XCTAssertEqual(answer.object["sent_to"] as? String, "newbie@localhost")
        var message = try await newbie.expect("the admin's message") { $0.name == "message" }
        XCTAssertEqual(message[attribute: "from"], "localhost")
        XCTAssertEqual(message.child("body")?.text, "welcome aboard")
        try await api.expect(400, "POST", "/messages", body: ["body": "to nobody"])
        answer = try await api.call("POST", "/hosts/localhost/announce", body: ["subject": "Maintenance", "body": "restart at 22:00"])
        XCTAssertEqual(answer.object["recipients"] as? Int, 1)
        message = try await newbie.expect("the announcement") { $0.name == "message" }
        XCTAssertEqual(message[attribute: "type"], "headline")
        XCTAssertEqual(message.child("subject")?.text, "Maintenance")

        // To every account: a1 is away, so its copies wait offline; the purge deletes the first two.
        for note in ["first note", "second note"] {
            answer = try await api.call("POST", "/hosts/localhost/announce", query: "offline=true", body: ["body": note])
            XCTAssertEqual(answer.object["recipients"] as? Int, 3)
            message = try await newbie.expect(note) { $0.name == "message" && $0.child("body")?.text == note }
        }
        // Offline storage writes after the announcement is answered: wait until both are stored.
        try await api.waitForOfflineMessages(2, of: "a1")
        answer = try await api.call("DELETE", "/hosts/localhost/users/a1/offline")
        XCTAssertEqual(answer.object["deleted"] as? Int, 2)
        _ = try await api.call("POST", "/hosts/localhost/announce", query: "offline=true", body: ["body": "third note"])
        try await api.waitForOfflineMessages(1, of: "a1")
        answer = try await api.call("GET", "/hosts/localhost/users/a1")
        XCTAssertEqual(answer.object["jid"] as? String, "a1@localhost")
        XCTAssertEqual(answer.object["sessions"] as? [String], [])
        let a1 = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "a1", password: "pw1", resource: "r")
        a1.send("<presence/>")
        message = try await a1.expect("the offline message") { $0.name == "message" }
        XCTAssertEqual(message.child("body")?.text, "third note")

        // The archive: a1's chat with b1 is archived, then purged.
        a1.send("<message to='b1@localhost' type='chat' id='m1'><body>for the archive</body></message>")
        var archived = try await MAM.query(a1)
        for _ in 0..<100 where archived.messages.isEmpty {
            try await Task.sleep(for: .milliseconds(50))
            archived = try await MAM.query(a1)
        }
        XCTAssertEqual(archived.messages.count, 1)
        answer = try await api.call("POST", "/archives/purge", body: ["before": "2100-01-01T00:00:00Z", "user": "a1@localhost"])
        XCTAssertEqual(answer.object["deleted"] as? Int, 1)
        let purged = try await MAM.query(a1)
        XCTAssertEqual(purged.messages.count, 0)
        try await api.expect(400, "POST", "/archives/purge", body: ["before": "yesterday"])

        // MUC rooms: created open for its owner, listed, destroyed with its occupants told.
        answer = try await api.call("POST", "/hosts/localhost/rooms", body: ["name": "lobby", "owner": "a1@localhost", "title": "The lobby"])
        XCTAssertEqual(answer.status, 201)
        XCTAssertEqual(answer.object["jid"] as? String, "lobby@conference.localhost")
        try await api.expect(409, "POST", "/hosts/localhost/rooms", body: ["name": "lobby", "owner": "a1@localhost"])
        answer = try await api.call("GET", "/hosts/localhost/rooms")
        let rooms = try XCTUnwrap(answer.object["rooms"] as? [[String: Any]])
        XCTAssertEqual(rooms.map { $0["name"] as? String }, ["lobby"])
        XCTAssertEqual(rooms.first?["persistent"] as? Bool, true)
        XCTAssertEqual(rooms.first?["title"] as? String, "The lobby")
        let joined = try await MUC.join(a1, "lobby", nick: "alpha")
        XCTAssertEqual(MUC.item(joined.own)?[attribute: "affiliation"], "owner")
        XCTAssertFalse(MUC.statuses(joined.own).contains(201), "the room existed already")
        answer = try await api.call("DELETE", "/hosts/localhost/rooms/lobby", query: "reason=closing%20time")
        XCTAssertEqual(answer.object["destroyed"] as? Bool, true)
        let gone = try await a1.expect("the room's end") { $0.name == "presence" && $0[attribute: "type"] == "unavailable" }
        XCTAssertEqual(gone.child("x", namespace: MUC.user)?.child("destroy", namespace: MUC.user)?.child("reason")?.text, "closing time")
        try await api.expect(404, "DELETE", "/hosts/localhost/rooms/lobby")
        answer = try await api.call("GET", "/hosts/localhost/rooms")
        XCTAssertEqual((answer.object["rooms"] as? [Any])?.count, 0)

        // Modules' commands, listed and run by name.
        answer = try await api.call("GET", "/hosts/localhost/commands")
        let commands = (answer.object["commands"] as? [[String: Any]])?.compactMap { $0["name"] as? String } ?? []
        XCTAssertEqual(commands, ["create-room", "destroy-room", "list-rooms"])
        answer = try await api.call("POST", "/hosts/localhost/commands/create-room", body: ["name": "side", "owner": "b1@localhost", "persistent": false])
        XCTAssertEqual((answer.object["result"] as? [String: Any])?["persistent"] as? Bool, false)
        answer = try await api.call("POST", "/hosts/localhost/commands/list-rooms")
        XCTAssertEqual(((answer.object["result"] as? [[String: Any]])?.first)?["name"] as? String, "side")
        try await api.expect(404, "POST", "/hosts/localhost/commands/launch-rockets")
        try await api.expect(400, "POST", "/hosts/localhost/commands/create-room", body: ["name": "no-owner"])

        // Reloads.
        answer = try await api.call("POST", "/reload/config", body: ["dry_run": true])
        XCTAssertEqual(answer.status, 200)
        try await api.expect(200, "POST", "/reload/hooks")
        answer = try await api.call("POST", "/reload/modules/rate_limits")
        XCTAssertTrue((answer.object["changes"] as? [String])?.first?.hasPrefix("rate_limits reloaded on ") ?? false, "\(answer.object)")
        answer = try await api.call("POST", "/reload/modules/disco")
        XCTAssertEqual(answer.status, 400)
        XCTAssertTrue((answer.object["error"] as? String)?.contains("'disco' is built in") ?? false, "\(answer.object)")

        // Password change, kick and unregister, as the user's clients see them.
        try await api.expect(204, "PUT", "/hosts/localhost/users/newbie/password", body: ["password": "np2"])
        try await api.expect(404, "PUT", "/hosts/localhost/users/nobody/password", body: ["password": "np2"])
        do {
            _ = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "newbie", password: "np", resource: "old")
            XCTFail("the old password still works")
        } catch {}
        let second = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "newbie", password: "np2", resource: "r2")
        answer = try await api.call("POST", "/sessions/kick", body: ["jid": "newbie@localhost/r", "reason": "testing"])
        XCTAssertEqual(answer.object["kicked"] as? Int, 1)
        let kickError = try await newbie.expectStreamError()
        XCTAssertEqual(kickError, "policy-violation")
        // The server unbinds the kicked session once its connection has closed, a moment after the client saw
        // the error: wait for that, so the unregistration below counts only the session still open.
        for _ in 0..<200 {
            let sessions = try await api.call("GET", "/sessions")
            let jids = (sessions.object["sessions"] as? [[String: Any]])?.compactMap { $0["jid"] as? String } ?? []
            if !jids.contains("newbie@localhost/r") { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        try await api.expect(404, "POST", "/sessions/kick", body: ["jid": "nobody@localhost"])
        answer = try await api.call("DELETE", "/hosts/localhost/users/newbie")
        XCTAssertEqual(answer.object["sessions_closed"] as? Int, 1)
        let unregisterError = try await second.expectStreamError()
        XCTAssertEqual(unregisterError, "not-authorized")
        try await api.expect(404, "DELETE", "/hosts/localhost/users/newbie")
        answer = try await api.call("GET", "/hosts/localhost/users")
        XCTAssertEqual(answer.object["users"] as? [String], ["a1", "b1"])

        // starlingctl still works over the local socket next to it.
        let (status, text) = try server.ctl(["connected-users"])
        XCTAssertEqual(status, 0, text)
        XCTAssertTrue(text.contains("a1@localhost/r"), text)
        await a1.close()

        // Every exchange against the document, by an independent OpenAPI validator.
        let exchangesPath = server.directory.appendingPathComponent("exchanges.json").path
        try JSONSerialization.data(withJSONObject: api.exchanges, options: [.prettyPrinted]).write(to: URL(fileURLWithPath: exchangesPath))
        let (checkStatus, report) = try ServerProcess.run("/usr/bin/env", [
            "python3", Self.repository.appendingPathComponent("Tests/Interop/openapi_check.py").path,
            Self.repository.appendingPathComponent("docs/admin-api.yaml").path, exchangesPath,
        ])
        XCTAssertEqual(checkStatus, 0, report)
    }

    func testConfigurationNeedsAToken() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-admin-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let config = directory.appendingPathComponent("starling.yml").path
        try "hosts: [localhost]\nlisteners:\n  - { type: admin, token_file: short.token }\n".write(toFile: config, atomically: true, encoding: .utf8)
        try "too short".write(toFile: directory.appendingPathComponent("short.token").path, atomically: true, encoding: .utf8)
        let (status, text) = try ServerProcess.run(ServerProcess.executable("starlingctl"), ["status", "--config", config])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(text.contains("starling.yml:3") && text.contains("fewer than 32 characters"), text)
    }
}
