import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// PostgreSQL stops under a running server and comes back: requests that need it fail cleanly in the
/// meantime, the server and its sessions carry on, and nothing that was acknowledged is lost.
final class PostgresOutageTests: XCTestCase {
    func testServerSurvivesADatabaseRestart() async throws {
        guard let cluster = ProcessInfo.processInfo.environment["STARLING_TEST_POSTGRES_CLUSTER"] else {
            throw XCTSkip("needs the PostgreSQL cluster scripts/test starts")
        }
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/pg-test-cluster").path
        let server = try ServerProcess(users: [("olga", "olga-pw"), ("pete", "pete-pw")], backend: .postgresql, storageTimeout: 1)
        defer { server.stop() }
        let olga = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "olga", password: "olga-pw")
        olga.send("<iq type='set' id='before'><query xmlns='jabber:iq:roster'><item jid='pete@localhost' name='Pete'/></query></iq>")
        let acknowledged = try await olga.waitFor("roster ack") { if case .element(let e) = $0 { return e[attribute: "id"] == "before" }; return false }
        guard case .element(let ack) = acknowledged else { return XCTFail() }
        XCTAssertEqual(ack[attribute: "type"], "result")
        olga.send("<message to='pete@localhost' type='chat'><body>stored before the outage</body></message>")
        try await Task.sleep(for: .milliseconds(500))

        let (stopped, stopOutput) = try ServerProcess.run(script, ["stop", cluster])
        XCTAssertEqual(stopped, 0, stopOutput)
        var starter: Process?
        defer {
            if starter == nil { starter = try? ServerProcess.startDaemon(script, ["resume", cluster]) }
            // PostgreSQL is up by the time the test ends (it logged in through it); its starter may linger.
            usleep(1_000_000)
            if starter?.isRunning == true { starter?.terminate() }
        }

        // Storage requests fail with an error, promptly...
        olga.send("<iq type='set' id='during'><query xmlns='jabber:iq:roster'><item jid='nobody@localhost'/></query></iq>")
        let failed = try await olga.waitFor(timeout: 15, "roster error") { if case .element(let e) = $0 { return e[attribute: "id"] == "during" }; return false }
        guard case .element(let failure) = failed else { return XCTFail() }
        XCTAssertEqual(failure[attribute: "type"], "error")
        XCTAssertEqual(failure.child("error")?.elements.first?.name, "internal-server-error")
        // ...while the session itself carries on,
        olga.send("<iq type='get' id='alive'><ping xmlns='urn:xmpp:ping'/></iq>")
        let pong = try await olga.waitFor("pong") { if case .element(let e) = $0 { return e[attribute: "id"] == "alive" }; return false }
        guard case .element(let pongElement) = pong else { return XCTFail() }
        XCTAssertEqual(pongElement[attribute: "type"], "result")
        // and a login is told to come back later (temporary-auth-failure), not that its password is wrong.
        let (loginStatus, loginOutput) = try ServerProcess.slixmpp(["badauth", "--port", "\(server.starttlsPort)", "--jid-a", "pete@localhost", "--password-a", "pete-pw"])
        XCTAssertEqual(loginStatus, 0, loginOutput)
        XCTAssertTrue(server.log.contains("storage failure during authentication"), server.log)

        starter = try ServerProcess.startDaemon(script, ["resume", cluster])

        // Back to normal: the acknowledged roster item and the stored message are there.
        var pete: TestClient?
        for _ in 0..<60 where pete == nil {
            pete = try? await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "pete", password: "pete-pw")
            if pete == nil { try await Task.sleep(for: .milliseconds(500)) }
        }
        let recovered = try XCTUnwrap(pete, "the server serves again once PostgreSQL is back")
        let stored = try await recovered.waitFor("offline message") { if case .element(let e) = $0 { return e.child("body")?.text == "stored before the outage" }; return false }
        XCTAssertNotNil(stored)
        olga.send("<iq type='get' id='after'><query xmlns='jabber:iq:roster'/></iq>")
        let roster = try await olga.waitFor("roster") { if case .element(let e) = $0 { return e[attribute: "id"] == "after" }; return false }
        guard case .element(let rosterElement) = roster else { return XCTFail() }
        XCTAssertEqual(rosterElement.child("query")?.elements.compactMap { $0[attribute: "jid"] }, ["pete@localhost"])
        await recovered.close()
        await olga.close()
        XCTAssertEqual(server.stop(), 0, server.log)
    }
}
