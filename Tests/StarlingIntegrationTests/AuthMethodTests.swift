import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// `auth.method`: passwords decided by a Lua script or by the external_auth plugin (ejabberd's extauth
/// protocol) instead of the stored SCRAM keys.
final class AuthMethodTests: XCTestCase {
    /// An extauth program: accepts ext/extpw on any host, refuses the rest.
    static let extauth = """
    #!/usr/bin/env python3
    import struct, sys
    while True:
        header = sys.stdin.buffer.read(2)
        if len(header) < 2:
            break
        (length,) = struct.unpack(">H", header)
        request = sys.stdin.buffer.read(length).decode()
        operation, user, host, password = (request.split(":", 3) + ["", "", ""])[:4]
        ok = operation == "auth" and user == "ext" and password == "extpw"
        sys.stdout.buffer.write(struct.pack(">HH", 2, 1 if ok else 0))
        sys.stdout.buffer.flush()
    """

    private func expectLogin(_ server: ServerProcess, _ username: String, _ password: String, succeeds: Bool, host: String = "localhost",
                             file: StaticString = #filePath, line: UInt = #line) async throws {
        do {
            let client = try await TestClient.login(port: server.directTLSPort, domain: host, tls: .direct,
                                                    username: username, password: password, mechanism: "PLAIN")
            XCTAssertTrue(succeeds, "\(username) logged in", file: file, line: line)
            await client.close()
        } catch {
            XCTAssertFalse(succeeds, "\(username): \(error)", file: file, line: line)
            XCTAssertTrue("\(error)".contains("not-authorized"), "\(error)", file: file, line: line)
        }
    }

    /// A server whose `auth:` section is `auth` and whose external_auth module runs `program`.
    private func externalAuthServer(auth: String, program: String, users: [(String, String)]) throws -> ServerProcess {
        guard let plugin = ProcessInfo.processInfo.environment["STARLING_TEST_EXTAUTH_PLUGIN"] else {
            throw XCTSkip("STARLING_TEST_EXTAUTH_PLUGIN is not set: scripts/test builds the plugins and sets it")
        }
        return try ServerProcess(extraConfig: """
        auth:
          failure_delay: 0.1
          \(auth)
        plugins:
          external_auth: \(plugin)
        modules:
          disco: {}
          roster: {}
          presence: {}
          external_auth: { program: extauth.py, timeout: 5 }
        """, users: users, files: ["extauth.py": program])
    }

    func testALuaScriptDecidesPasswordsAndOnlyPLAINIsOffered() async throws {
        let server = try ServerProcess(extraConfig: """
        auth: { method: lua, failure_delay: 0.1 }
        modules:
          disco: {}
          roster: {}
          presence: {}
          lua: { scripts: [hooks/auth.lua] }
        """, users: [("stored", "storedpw")], files: ["hooks/auth.lua": """
        local passwords = { ext = "secret" }
        starling.hook("authenticate", function(attempt)
          if passwords[attempt.attr.username] == attempt.attr.password and attempt.attr.host == "localhost" then
            return "allow"
          end
        end)
        """])
        defer { XCTAssertEqual(server.stop(), 0) }
        let client = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        _ = try await client.openStream()
        XCTAssertEqual(client.offeredMechanisms, ["PLAIN"])
        await client.close()

        try await expectLogin(server, "ext", "secret", succeeds: true)
        try await expectLogin(server, "ext", "wrong", succeeds: false)
        // The stored account's keys are not consulted on this host.
        try await expectLogin(server, "stored", "storedpw", succeeds: false)
    }

    func testTheExternalAuthPluginAsksAnExtauthProgram() async throws {
        let server = try externalAuthServer(auth: "host_methods: { example.test: external_auth }", program: Self.extauth,
                                            users: [("stored", "storedpw")])
        defer { XCTAssertEqual(server.stop(), 0) }

        try await expectLogin(server, "ext", "extpw", succeeds: true, host: "example.test")
        try await expectLogin(server, "ext", "nope", succeeds: false, host: "example.test")
        // localhost still uses the stored keys.
        try await expectLogin(server, "stored", "storedpw", succeeds: true)
        try await expectLogin(server, "ext", "extpw", succeeds: false)
    }

    func testAnExternalAuthProgramThatDiesIsRestartedAndTheServerCarriesOn() async throws {
        // Answers one request, then stops reading but stays alive: the next write hits a pipe nobody reads.
        let oneShot = Self.extauth.replacingOccurrences(
            of: "    sys.stdout.buffer.flush()",
            with: "    sys.stdout.buffer.flush()\n    import os, time\n    os.close(0)\n    time.sleep(60)")
        XCTAssertNotEqual(oneShot, Self.extauth)
        let server = try externalAuthServer(auth: "method: external_auth", program: oneShot, users: [])
        defer { XCTAssertEqual(server.stop(), 0) }
        try await expectLogin(server, "ext", "extpw", succeeds: true)
        // The program no longer reads: that login fails (the write gets EPIPE, and the program is
        // replaced); the server stays up and the next login works.
        var succeeded = false
        for _ in 0..<5 where !succeeded {
            if let client = try? await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct,
                                                        username: "ext", password: "extpw", mechanism: "PLAIN") {
                succeeded = true
                await client.close()
            }
        }
        XCTAssertTrue(succeeded)
        XCTAssertTrue(server.process.isRunning)
    }
}
