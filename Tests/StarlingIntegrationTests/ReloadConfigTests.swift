import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// `starlingctl reload-config` on the real server, while messages flow.
final class ReloadConfigTests: XCTestCase {
    static let users = [("c1", "pw1"), ("c2", "pw2")]

    private func login(_ server: ServerProcess, _ number: Int) async throws -> TestClient {
        try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct,
                                   username: "c\(number)", password: "pw\(number)", resource: "r")
    }

    private func nextStanza(_ client: TestClient, _ name: String, id: String? = nil) async throws -> XMLElement {
        let event = try await client.waitFor(timeout: 10, "a \(name)") { event in
            if case .element(let element) = event { return element.name == name && (id == nil || element[attribute: "id"] == id) }
            return false
        }
        guard case .element(let element) = event else { throw TestClientError.unexpected("\(event)") }
        return element
    }

    /// Whether the server answers XEP-0092 version queries right now.
    private func answersVersion(_ client: TestClient, id: String) async throws -> Bool {
        client.send("<iq type='get' id='\(id)' to='localhost'><query xmlns='jabber:iq:version'/></iq>")
        return try await nextStanza(client, "iq", id: id)[attribute: "type"] == "result"
    }

    func testModuleChangesApplyWholeUnderTrafficAndTheRestWaitsForARestart() async throws {
        let modules = """
        modules:
          disco: {}
          ping: {}
          roster: {}
          presence: {}
        """
        let server = try ServerProcess(extraConfig: modules, users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let alice = try await login(server, 1)
        let bob = try await login(server, 2)
        let original = try String(contentsOfFile: server.configPath, encoding: .utf8)
        let versionBefore = try await answersVersion(alice, id: "v0")
        XCTAssertFalse(versionBefore)

        let total = 600
        let sender = Task {
            for index in 0..<total {
                alice.send("<message to='c2@localhost/r' type='chat'><body>m\(index)</body></message>")
                if index % 20 == 0 { try await Task.sleep(for: .milliseconds(5)) }
            }
        }
        // One module added and the log level changed: the module applies, the log level waits.
        let changed = original.replacingOccurrences(of: "log_level: info", with: "log_level: debug") + "\n  version: {}\n"
        try changed.write(toFile: server.configPath, atomically: true, encoding: .utf8)
        let (dryStatus, dryRun) = try server.ctl(["reload-config", "--dry-run"])
        XCTAssertEqual(dryStatus, 0, dryRun)
        XCTAssertTrue(dryRun.contains("would apply: localhost: version enabled"), dryRun)
        XCTAssertTrue(dryRun.contains("needs a restart: log_level changed"), dryRun)
        let afterDryRun = try await answersVersion(bob, id: "v1")
        XCTAssertFalse(afterDryRun)

        let (status, output) = try server.ctl(["reload-config"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("applied: localhost: version enabled"), output)
        XCTAssertTrue(output.contains("applied: example.test: version enabled"), output)

        // A config that does not validate changes nothing and says where the problem is.
        try (changed + "  offline: { max_messages: -5 }\n").write(toFile: server.configPath, atomically: true, encoding: .utf8)
        let (badStatus, bad) = try server.ctl(["reload-config"])
        XCTAssertNotEqual(badStatus, 0)
        XCTAssertTrue(bad.contains("starling.yml:16: modules.offline.max_messages: -5 is out of range"), bad)
        try await sender.value

        var received = Set<String>()
        while received.count < total {
            if let body = try await nextStanza(bob, "message").child("body")?.text { received.insert(body) }
        }
        XCTAssertEqual(received.count, total)
        let versionAfter = try await answersVersion(alice, id: "v2")
        XCTAssertTrue(versionAfter)
        // Both sessions survived every reload.
        bob.send("<message to='c1@localhost/r' type='chat'><body>done</body></message>")
        let last = try await nextStanza(alice, "message").child("body")?.text
        XCTAssertEqual(last, "done")
    }
}
