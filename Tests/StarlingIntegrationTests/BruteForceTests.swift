import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Password guessing against one account from many addresses (a botnet): after a few failures the
/// account is closed to addresses it never logged in from, its owner still gets in, other accounts are
/// untouched, and the shipped fail2ban filter finds every guessing address in our log.
final class BruteForceTests: XCTestCase {
    private func attempt(_ server: ServerProcess, _ user: String, _ password: String, from address: String) async -> Result<Void, TestClientError> {
        do {
            let client = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: user, password: password,
                                                    source: address)
            await client.close()
            return .success(())
        } catch let error as TestClientError {
            return .failure(error)
        } catch {
            return .failure(.unexpected("\(error)"))
        }
    }

    private func condition(_ result: Result<Void, TestClientError>) -> String? {
        switch result {
        case .success: return nil
        case .failure(.authenticationFailed(let condition)): return condition
        case .failure(let error): return "\(error)"
        }
    }

    func testAGuessedAccountClosesToNewAddressesWhileItsOwnerGetsIn() async throws {
        let server = try ServerProcess(extraConfig: """
        auth:
          failure_delay: 0
          failures_before_slowdown: 1000
          account_failures_before_lockout: 3
        """, users: [("victim", "right-password"), ("bystander", "other-password")])
        defer { XCTAssertEqual(server.stop(), 0) }

        let owner = await attempt(server, "victim", "right-password", from: "127.0.0.2")
        XCTAssertNil(condition(owner), "the owner logs in from home first")
        for bot in 3...5 {
            let guess = await attempt(server, "victim", "guess-\(bot)", from: "127.0.0.\(bot)")
            XCTAssertEqual(condition(guess), "not-authorized")
        }
        // Locked now: even the right password from an address the account never used is refused, unread.
        let lucky = await attempt(server, "victim", "right-password", from: "127.0.0.6")
        XCTAssertEqual(condition(lucky), "temporary-auth-failure")
        let plain = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct, source: "127.0.0.7")
        _ = try await plain.openStream()
        do {
            try await plain.authenticate(username: "victim", password: "right-password", mechanism: "PLAIN")
            XCTFail("PLAIN got past the lock")
        } catch TestClientError.authenticationFailed(let condition) {
            XCTAssertEqual(condition, "temporary-auth-failure")
        }
        await plain.close()
        let home = await attempt(server, "victim", "right-password", from: "127.0.0.2")
        XCTAssertNil(condition(home), "the owner still gets in from an address it used before")
        let bystander = await attempt(server, "bystander", "other-password", from: "127.0.0.6")
        XCTAssertNil(condition(bystander), "other accounts are not affected")

        // examples/fail2ban matches one line per failure, with the guessing addresses.
        let filter = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("examples/fail2ban/filter.d/starling.conf").path
        let (status, output) = try ServerProcess.run("/usr/bin/fail2ban-regex", ["--print-all-matched", server.errorLogPath, filter])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("Failregex: 5 total"), output)
        for address in ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7"] {
            XCTAssertTrue(output.contains(address), "\(address) not matched:\n\(output)")
        }
        XCTAssertFalse(output.contains("address=127.0.0.2 "), "the owner's address was never a failure:\n\(output)")
    }
}
