import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Abuse the core withstands with its defaults: password guessing against one account from many
/// addresses (a botnet), and connections that never finish their handshake (a slow-loris).
final class AbuseDefenceTests: XCTestCase {
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

    /// Connections that send nothing take one address's allowance of unauthenticated connections and
    /// are closed by the authentication timeout; logged-in users talk on meanwhile, and other addresses
    /// connect as usual.
    func testASlowLorisIsBoundedPerAddressAndByTheAuthenticationTimeout() async throws {
        let server = try ServerProcess(extraConfig: """
        limits:
          auth_timeout: 3
          max_unauthenticated_per_address: 20
        """, users: [("alice", "alice-pw"), ("bob", "bob-pw")])
        defer { XCTAssertEqual(server.stop(), 0) }
        let alice = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "alice", password: "alice-pw",
                                               resource: "a", source: "127.0.0.2")
        let bob = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "bob", password: "bob-pw",
                                             resource: "b", source: "127.0.0.2")
        // The loris: twenty connections from one address that open a stream and then say nothing more.
        var loris: [TestClient] = []
        for _ in 1...20 {
            let connection = try await TestClient.connect(port: server.starttlsPort, domain: "localhost", tls: .starttls, source: "127.0.0.9")
            _ = try await connection.openStream()
            loris.append(connection)
        }
        // One more from that address is closed before anything it sends is read: no stream header back.
        let extra = try await TestClient.connect(port: server.starttlsPort, domain: "localhost", tls: .starttls, source: "127.0.0.9")
        extra.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
        let answer = try await extra.next()
        XCTAssertEqual(answer, .disconnected)
        // Meanwhile logged-in users are served, and another address connects.
        alice.send("<message to='bob@localhost/b' type='chat'><body>still here</body></message>")
        let delivered = try await bob.expect("alice's message") { $0.child("body")?.text == "still here" }
        XCTAssertEqual(delivered[attribute: "from"], "alice@localhost/a")
        let other = try await TestClient.connect(port: server.starttlsPort, domain: "localhost", tls: .starttls, source: "127.0.0.10")
        let features = try await other.openStream()
        XCTAssertEqual(features.name, "features")
        await other.close()
        // The authentication timeout ends the loris; then its address may connect again.
        for connection in loris { _ = try await connection.waitFor(timeout: 30, "a silent connection closed") { $0 == .disconnected } }
        let again = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "alice", password: "alice-pw",
                                               resource: "again", source: "127.0.0.9")
        await again.close()
        XCTAssertTrue(server.log.contains("too many unauthenticated connections from this address"), server.log)
        for client in [alice, bob] { await client.close() }
    }

    /// New connections from one address are limited in rate and in number; other addresses are not.
    func testConnectionsPerAddressAreLimitedInRateAndNumber() async throws {
        let server = try ServerProcess(extraConfig: """
        limits:
          connection_rate: 0.01
          connection_burst: 4
          max_connections_per_address: 2
        """, users: [("alice", "alice-pw")])
        defer { XCTAssertEqual(server.stop(), 0) }
        func opens(from address: String) async throws -> (TestClient, Bool) {
            let client = try await TestClient.connect(port: server.starttlsPort, domain: "localhost", tls: .starttls, source: address)
            client.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
            let answer = try await client.next()
            if case .streamOpen = answer { return (client, true) }
            return (client, false)
        }
        let (first, firstOpened) = try await opens(from: "127.0.0.20")
        let (second, secondOpened) = try await opens(from: "127.0.0.20")
        XCTAssertTrue(firstOpened && secondOpened)
        let (third, thirdOpened) = try await opens(from: "127.0.0.20")
        XCTAssertFalse(thirdOpened, "a third connection at once is refused")
        await first.close()
        _ = try await first.waitFor("closed") { $0 == .disconnected }
        // The server counts the close when it sees it; the fourth token of the burst is then usable.
        var fourthOpened = false
        var attempts: [TestClient] = []
        for _ in 1...50 where !fourthOpened {
            let (client, opened) = try await opens(from: "127.0.0.20")
            attempts.append(client)
            fourthOpened = opened
            if !opened { try await Task.sleep(for: .milliseconds(50)) }
        }
        XCTAssertTrue(fourthOpened, "a connection closed makes room again")
        let (fifth, fifthOpened) = try await opens(from: "127.0.0.21")
        XCTAssertTrue(fifthOpened, "other addresses connect as usual")
        XCTAssertTrue(server.log.contains("too many connections from this address"), server.log)
        for client in [second, third, fifth] + attempts { await client.close() }
    }
}
