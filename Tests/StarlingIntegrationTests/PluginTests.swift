import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Dynamic plugin modules on the real server: plugins/rate_limits as built by scripts/test, the same
/// plugin built against a PluginAPI with another version, and reloading while messages flow.
final class PluginTests: XCTestCase {
    static let users = (1...4).map { ("p\($0)", "pw\($0)") }

    private func plugin(_ variable: String) throws -> String {
        guard let path = ProcessInfo.processInfo.environment[variable] else {
            throw XCTSkip("\(variable) is not set: scripts/test builds the plugins and sets it")
        }
        return path
    }

    private func login(_ server: ServerProcess, _ number: Int) async throws -> TestClient {
        try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct,
                                   username: "p\(number)", password: "pw\(number)", resource: "r")
    }



    private func pluginImages(_ server: ServerProcess) throws -> Int? {
        let (_, status) = try server.ctl(["status"])
        let object = try JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any]
        return object?["pluginImages"] as? Int
    }

    func testAPluginLimitsAndBadPluginsAreRefusedWhileTheServerRuns() async throws {
        let server = try ServerProcess(extraConfig: """
        plugins:
          rate_limits: \(try plugin("STARLING_TEST_PLUGIN"))
          old_api: \(try plugin("STARLING_TEST_MISMATCHED_PLUGIN"))
          missing: /nonexistent/libMissing.so
        modules:
          disco: {}
          roster: {}
          presence: {}
          rate_limits: { rate: 0.2, burst: 3 }
          old_api: {}
          missing: {}
        """, users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let log = server.log
        XCTAssertTrue(log.contains("built against plugin API version 9\(StarlingAPIVersion.api), but this server provides version \(StarlingAPIVersion.api)"), log)
        XCTAssertTrue(log.contains("/nonexistent/libMissing.so: no such file"), log)

        let alice = try await login(server, 1)
        let bob = try await login(server, 2)
        // A burst of 3: the initial presence took one token, two messages pass, the other three are refused.
        for index in 1...5 { send(alice, to: "p2@localhost/r", "m\(index)") }
        for index in 1...2 {
            let body = try await nextMessage(bob).child("body")?.text
            XCTAssertEqual(body, "m\(index)")
        }
        for _ in 3...5 {
            let refused = try await nextMessage(alice)
            XCTAssertEqual(refused[attribute: "type"], "error")
            XCTAssertNotNil(refused.child("error")?.child("policy-violation"), "\(refused)")
        }
        // The server serves on without the refused plugins.
        send(bob, to: "p1@localhost/r", "fine")
        let body = try await nextMessage(alice).child("body")?.text
        XCTAssertEqual(body, "fine")
        // The refused plugin's image stays mapped too: it was opened before its version was read.
        XCTAssertEqual(try pluginImages(server), 2)

        let (status, output) = try server.ctl(["reload-module", "disco"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("'disco' is built in"), output)
    }

    func testSpamFilterRefusesKeywordsAndDropsBlockedSenders() async throws {
        let server = try ServerProcess(extraConfig: """
        plugins:
          spam_filter: \(try plugin("STARLING_TEST_SPAM_PLUGIN"))
        modules:
          disco: {}
          roster: {}
          presence: {}
          spam_filter: { keywords: [casino bonus], blocked_jids: [p3@localhost] }
        """, users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let alice = try await login(server, 1)
        let bob = try await login(server, 2)
        let spammer = try await login(server, 3)
        send(alice, to: "p2@localhost/r", "Your CASINO BONUS awaits")
        let refused = try await nextMessage(alice)
        XCTAssertNotNil(refused.child("error")?.child("policy-violation"), "\(refused)")
        send(spammer, to: "p2@localhost/r", "hi from a blocked sender")
        send(alice, to: "p2@localhost/r", "hello")
        let first = try await nextMessage(bob).child("body")?.text
        XCTAssertEqual(first, "hello")
    }

    func testConnectionRateAndLoginFailureLimits() async throws {
        let plugin = try plugin("STARLING_TEST_PLUGIN")
        let connections = try ServerProcess(extraConfig: """
        plugins:
          rate_limits: \(plugin)
        modules:
          disco: {}
          rate_limits: { connection_rate: 0.01, connection_burst: 3 }
        """, users: Self.users)
        defer { XCTAssertEqual(connections.stop(), 0) }
        var open: [TestClient] = []
        for _ in 1...3 {
            let client = try await TestClient.connect(port: connections.directTLSPort, domain: "localhost", tls: .direct)
            _ = try await client.openStream()
            open.append(client)
        }
        let fourth = try await TestClient.connect(port: connections.directTLSPort, domain: "localhost", tls: .direct)
        do {
            _ = try await fourth.openStream()
            XCTFail("a fourth connection from the same address got a stream")
        } catch {}
        for client in open { await client.close() }

        let logins = try ServerProcess(extraConfig: """
        auth:
          failure_delay: 0.1
        plugins:
          rate_limits: \(plugin)
        modules:
          disco: {}
          rate_limits: { login_failures: 2, login_failure_window: 300 }
        """, users: Self.users)
        defer { XCTAssertEqual(logins.stop(), 0) }
        func attempt(_ user: String, _ password: String) async -> Bool {
            guard let client = try? await TestClient.login(port: logins.directTLSPort, domain: "localhost", tls: .direct,
                                                          username: user, password: password) else { return false }
            await client.close()
            return true
        }
        let wrong1 = await attempt("p1", "wrong"), wrong2 = await attempt("p1", "wrong")
        XCTAssertFalse(wrong1 || wrong2)
        // Two failures: even the right password is refused for this account now, not for others.
        let blocked = await attempt("p1", "pw1")
        XCTAssertFalse(blocked)
        let other = await attempt("p2", "pw2")
        XCTAssertTrue(other)
        XCTAssertTrue(logins.log.contains("login refused by policy"), logins.log)
    }

    func testReloadingAPluginUnderTrafficLosesNothing() async throws {
        let server = try ServerProcess(extraConfig: """
        plugins:
          rate_limits: \(try plugin("STARLING_TEST_PLUGIN"))
        modules:
          disco: {}
          roster: {}
          presence: {}
          rate_limits: { rate: 100000, burst: 100000 }
        """, users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let alice = try await login(server, 3)
        let bob = try await login(server, 4)
        XCTAssertEqual(try pluginImages(server), 1)

        let total = 600
        let sender = Task {
            for index in 0..<total {
                send(alice, to: "p4@localhost/r", "m\(index)")
                if index % 20 == 0 { try await Task.sleep(for: .milliseconds(5)) }
            }
        }
        for _ in 0..<2 {
            let (status, output) = try server.ctl(["reload-module", "rate_limits"])
            XCTAssertEqual(status, 0, output)
            XCTAssertTrue(output.contains("rate_limits reloaded on example.test, localhost"), output)
        }
        try await sender.value
        var received = Set<String>()
        while received.count < total {
            if let body = try await nextMessage(bob).child("body")?.text { received.insert(body) }
        }
        XCTAssertEqual(received.count, total)
        XCTAssertEqual(try pluginImages(server), 3)

        // Neither session was dropped by the reloads.
        send(bob, to: "p3@localhost/r", "done")
        let body = try await nextMessage(alice).child("body")?.text
        XCTAssertEqual(body, "done")
    }
}
