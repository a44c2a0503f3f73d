import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// XEP-0484 FAST on the real server: a client logs in once with its password, gets a token, and logs in
/// with the token alone afterwards (one round trip, Bind2 in it), across a restart; tokens are bound to their
/// mechanism and client, rotated, invalidated by the client, listed and revoked by the operator, and revoked
/// by a password change. An independent Python client does the same with its own HMACs.
final class FASTTests: XCTestCase {
    func connect(_ server: ServerProcess) async throws -> (TestClient, XMLElement) {
        let client = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        return (client, try await client.openStream())
    }

    func fastLoginFails(_ server: ServerProcess, token: String, mechanism: String = "HT-SHA-256-ENDP", userAgentID: String = TestClient.defaultUserAgentID,
                        condition: String = "not-authorized", _ message: String, line: UInt = #line) async throws {
        let (client, _) = try await connect(server)
        do {
            try await client.authenticateFAST(username: "phone", token: token, mechanism: mechanism, bindTag: "Talk", userAgentID: userAgentID)
            XCTFail(message, line: line)
        } catch TestClientError.authenticationFailed(let failure) {
            XCTAssertEqual(failure, condition, message, line: line)
        }
        await client.close()
    }

    func testTokenLoginWithoutThePasswordAcrossARestartUntilRevoked() async throws {
        var server = try ServerProcess(users: [("phone", "pw1"), ("desk", "pw2")])
        defer { XCTAssertEqual(server.stop(), 0) }
        let (first, features) = try await connect(server)
        let fast = features.child("authentication", namespace: "urn:xmpp:sasl:2")?.child("inline")?.child("fast", namespace: "urn:xmpp:fast:0")
        XCTAssertEqual(fast?.elements.map(\.text), ["HT-SHA-256-ENDP", "HT-SHA-256-NONE"], features.serialized())
        let success = try await first.authenticateSASL2(username: "phone", password: "pw1", mechanism: "SCRAM-SHA-256-PLUS", bindTag: "Talk",
                                                        requestToken: "HT-SHA-256-ENDP")
        let issued = try XCTUnwrap(TestClient.fastToken(in: success), success.serialized())
        let expiry = try XCTUnwrap(XMPPDateTime.parse(issued.expiry))
        XCTAssertEqual(expiry - Date().timeIntervalSince1970, 21 * 86400, accuracy: 300, "the default lifetime is 21 days")
        XCTAssertNotNil(first.boundJID)
        await first.close()

        let desk = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "desk", password: "pw2", resource: "r")
        func tokenLogin(_ note: String) async throws {
            let (phone, _) = try await connect(server)
            let success = try await phone.authenticateFAST(username: "phone", token: issued.token, mechanism: "HT-SHA-256-ENDP", bindTag: "Talk")
            XCTAssertNil(TestClient.fastToken(in: success), "not due for rotation yet")
            let jid = try XCTUnwrap(phone.boundJID, success.serialized())
            phone.send("<message to='desk@localhost/r' type='chat'><body>\(note)</body></message>")
            let received = try await desk.expect(note) { $0.name == "message" && $0.child("body")?.text == note }
            XCTAssertEqual(received[attribute: "from"], jid.description)
            await phone.close()
        }
        try await tokenLogin("by token")
        try await fastLoginFails(server, token: issued.token, mechanism: "HT-SHA-256-NONE", "a token works only with the mechanism it was issued for")
        try await fastLoginFails(server, token: issued.token, userAgentID: "another-installation", "a token belongs to its client installation")
        try await fastLoginFails(server, token: issued.token + "x", "a wrong token")

        let (status, listing) = try server.ctl(["fast-tokens", "phone", "localhost"])
        XCTAssertEqual(status, 0, listing)
        XCTAssertTrue(listing.contains(TestClient.defaultUserAgentID) && listing.contains("StarlingTestClient on loopback")
                      && listing.contains("\tnew\t") && listing.contains("HT-SHA-256-ENDP"), listing)
        await desk.close()

        // The key stays in data_dir: tokens outlive a restart.
        XCTAssertEqual(server.stop(), 0)
        server = try ServerProcess(restarting: server)
        let again = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "desk", password: "pw2", resource: "r")
        let (phone, _) = try await connect(server)
        try await phone.authenticateFAST(username: "phone", token: issued.token, mechanism: "HT-SHA-256-ENDP", bindTag: "Talk")
        XCTAssertNotNil(phone.boundJID)
        await phone.close()
        await again.close()

        let (revokeStatus, revoked) = try server.ctl(["revoke-fast-tokens", "phone", "localhost", "--client", TestClient.defaultUserAgentID])
        XCTAssertEqual(revokeStatus, 0, revoked)
        XCTAssertTrue(revoked.contains("revoked 1 FAST token"), revoked)
        try await fastLoginFails(server, token: issued.token, "a revoked token")

        // A password change revokes every token.
        let (other, _) = try await connect(server)
        let another = try await other.authenticateSASL2(username: "phone", password: "pw1", mechanism: "SCRAM-SHA-256", requestToken: "HT-SHA-256-NONE")
        let second = try XCTUnwrap(TestClient.fastToken(in: another))
        await other.close()
        let (changed, text) = try server.ctl(["change-password", "phone", "localhost", "pw3"])
        XCTAssertEqual(changed, 0, text)
        try await fastLoginFails(server, token: second.token, mechanism: "HT-SHA-256-NONE", "a token from before the password change")
    }

    /// Rotation (every login here, rotate_after: 0): the old token works until the new one is used, then not;
    /// `invalidate` logs a token out and brings no new one.
    func testRotationAndInvalidation() async throws {
        let server = try ServerProcess(extraConfig: "auth:\n  failure_delay: 0.2\n  fast:\n    rotate_after: 0\n", users: [("phone", "pw1")])
        defer { XCTAssertEqual(server.stop(), 0) }
        let (client, _) = try await connect(server)
        let success = try await client.authenticateSASL2(username: "phone", password: "pw1", mechanism: "PLAIN", requestToken: "HT-SHA-256-NONE")
        let first = try XCTUnwrap(TestClient.fastToken(in: success)).token
        await client.close()

        func login(_ token: String, invalidate: Bool = false) async throws -> String? {
            let (client, _) = try await connect(server)
            let success = try await client.authenticateFAST(username: "phone", token: token, bindTag: "Talk", invalidate: invalidate)
            await client.close()
            return TestClient.fastToken(in: success)?.token
        }
        let rotated = try await login(first)
        let second = try XCTUnwrap(rotated, "a token due for rotation brings a new one")
        XCTAssertNotEqual(second, first)
        // The client may have lost the success with the new token: the old one still works.
        let rotatedAgain = try await login(first)
        let third = try XCTUnwrap(rotatedAgain)
        try await fastLoginFails(server, token: second, mechanism: "HT-SHA-256-NONE", "an unused rotated token is replaced by the next one")
        let rotatedOnUse = try await login(third)
        let fourth = try XCTUnwrap(rotatedOnUse)
        try await fastLoginFails(server, token: first, mechanism: "HT-SHA-256-NONE", "using the new token retires the old one")
        let none = try await login(fourth, invalidate: true)
        XCTAssertNil(none, "logging a token out brings no new one")
        try await fastLoginFails(server, token: fourth, mechanism: "HT-SHA-256-NONE", "an invalidated token")
        let (status, listing) = try server.ctl(["fast-tokens", "phone", "localhost"])
        XCTAssertEqual(status, 0, listing)
        XCTAssertTrue(listing.contains("no FAST tokens"), listing)
    }

    /// An independent implementation of the HT mechanisms (Python's hmac and ssl) logs in with a token.
    func testIndependentClientLogsInWithAToken() async throws {
        let server = try ServerProcess(users: [("phone", "pw1"), ("desk", "pw2")])
        defer { XCTAssertEqual(server.stop(), 0) }
        let desk = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "desk", password: "pw2", resource: "r")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Interop/fast_client.py").path
        for mechanism in ["HT-SHA-256-ENDP", "HT-SHA-256-NONE"] {
            let (status, output) = try ServerProcess.run("/usr/bin/env", ["python3", script, "--port", "\(server.directTLSPort)", "--user", "phone",
                                                                          "--password", "pw1", "--peer", "desk@localhost/r", "--mechanism", mechanism])
            XCTAssertEqual(status, 0, output)
            XCTAssertTrue(output.contains("\"jid\": \"phone@localhost/fast_client."), output)
            _ = try await desk.expect("the Python client's message") { $0.name == "message" && $0.child("body")?.text == "FAST from Python" }
        }
        await desk.close()
    }
}
