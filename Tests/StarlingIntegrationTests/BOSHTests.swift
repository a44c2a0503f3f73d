import Foundation
import StarlingAPI
import StarlingTestClient
import StarlingXML
import XCTest
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// XMPP over BOSH (XEP-0124, XEP-0206) at /http-bind of the real server's HTTP listener: a session
/// next to TCP clients, request ordering and replay, termination, and what is refused.
final class BOSHTests: XCTestCase {
    static let users = (1...4).map { ("bosh\($0)", "pw\($0)") }
    nonisolated(unsafe) static var server: ServerProcess!
    nonisolated(unsafe) static var startFailure: (any Error)?
    static let namespace = "http://jabber.org/protocol/httpbind"

    override class func setUp() {
        super.setUp()
        do { server = try ServerProcess(extraConfig: """
        modules:
          disco: {}
          ping: {}
          roster: {}
          presence: {}
        """, users: users, extraListeners: ["{ type: http, address: 127.0.0.1, port: 0, trusted_proxies: [127.0.0.1] }"]) } catch {
            startFailure = error
        }
    }

    override func setUpWithError() throws {
        if let failure = Self.startFailure { throw failure }
    }

    override class func tearDown() {
        startFailure = nil
        XCTAssertEqual(server?.stop() ?? 0, 0)
        server = nil
        super.tearDown()
    }

    /// One BOSH client: posts `<body/>` elements with consecutive rids.
    final class Client: @unchecked Sendable {
        let url: URL
        var rid: Int64 = Int64.random(in: 1_000...1_000_000)
        var sid = ""

        init(port: Int) { url = URL(string: "http://127.0.0.1:\(port)/http-bind")! }

        /// Posts a body with `attributes` and `payload`, the next rid unless `rid` is given.
        func post(_ payload: String = "", attributes: String = "", rid explicit: Int64? = nil) async throws -> (status: Int, body: XMLElement) {
            let rid: Int64
            if let explicit { rid = explicit } else { self.rid += 1; rid = self.rid }
            let sidAttribute = sid.isEmpty ? "" : " sid='\(sid)'"
            var request = URLRequest(url: url)
            request.httpMethod = "POST"
            request.setValue("https", forHTTPHeaderField: "X-Forwarded-Proto")
            request.setValue("text/xml; charset=utf-8", forHTTPHeaderField: "Content-Type")
            request.httpBody = Data("<body xmlns='\(BOSHTests.namespace)' xmlns:xmpp='urn:xmpp:xbosh' rid='\(rid)'\(sidAttribute)\(attributes)>\(payload)</body>".utf8)
            let (data, response) = try await URLSession.shared.data(for: request)
            let text = String(decoding: data, as: UTF8.self)
            guard let body = XMLFragmentParser.parse(text, defaultNamespace: "") else { throw NSError(domain: "BOSH", code: 1, userInfo: [NSLocalizedDescriptionKey: "not XML: \(text)"]) }
            return ((response as! HTTPURLResponse).statusCode, body)
        }

        /// Creates the session, logs in with PLAIN and binds `resource`.
        func login(_ username: String, _ password: String, resource: String) async throws -> String {
            let created = try await post(attributes: " to='localhost' wait='3' hold='1' xmpp:version='1.0' ver='1.11'")
            sid = created.body[attribute: "sid"] ?? ""
            XCTAssertFalse(sid.isEmpty, created.body.serialized())
            var features = created.body.child("features")
            if features == nil { features = try await post().body.child("features") }
            XCTAssertNotNil(features?.child("mechanisms"))
            let credentials = Data("\0\(username)\0\(password)".utf8).base64EncodedString()
            let outcome = try await post("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(credentials)</auth>")
            XCTAssertNotNil(outcome.body.child("success"), outcome.body.serialized())
            let restarted = try await post(attributes: " to='localhost' xmpp:restart='true'")
            XCTAssertNotNil(restarted.body.child("features")?.child("bind"), restarted.body.serialized())
            let bound = try await post("<iq xmlns='jabber:client' type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>\(resource)</resource></bind></iq>")
            return bound.body.child("iq")?.child("bind")?.child("jid")?.text ?? ""
        }

        /// Polls until a payload element matches.
        func expect(_ what: String, where matches: (XMLElement) -> Bool) async throws -> XMLElement {
            for _ in 0..<20 {
                let answer = try await post()
                if let found = answer.body.elements.first(where: matches) { return found }
                XCTAssertNotEqual(answer.body[attribute: "type"], "terminate", answer.body.serialized())
            }
            throw NSError(domain: "BOSH", code: 2, userInfo: [NSLocalizedDescriptionKey: "no \(what)"])
        }
    }

    private var port: Int { Self.server.httpPort }

    func testLoginRosterAndMessagesBothWaysWithATCPClient() async throws {
        let bosh = Client(port: port)
        let jid = try await bosh.login("bosh1", "pw1", resource: "web")
        XCTAssertEqual(jid, "bosh1@localhost/web")
        let roster = try await bosh.post("<iq xmlns='jabber:client' type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>")
        XCTAssertEqual(roster.body.child("iq")?[attribute: "type"], "result", roster.body.serialized())

        let tcp = try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "bosh2", password: "pw2", resource: "tcp")
        _ = try await bosh.post("<message xmlns='jabber:client' to='bosh2@localhost/tcp' type='chat'><body>over BOSH</body></message>")
        let atTCP = try await tcp.expect("the BOSH client's message") { $0.name == "message" }
        XCTAssertEqual(atTCP[attribute: "from"], "bosh1@localhost/web")
        XCTAssertEqual(atTCP.child("body")?.text, "over BOSH")

        tcp.send("<message to='bosh1@localhost/web' type='chat'><body>back over TCP</body></message>")
        let reply = try await bosh.expect("the reply") { $0.name == "message" }
        XCTAssertEqual(reply.namespace, "jabber:client")
        XCTAssertEqual(reply.child("body")?.text, "back over TCP")

        let ended = try await bosh.post("<presence xmlns='jabber:client' type='unavailable'/>", attributes: " type='terminate'")
        XCTAssertEqual(ended.body[attribute: "type"], "terminate")
        let after = try await bosh.post()
        XCTAssertEqual(after.body[attribute: "type"], "terminate")
        XCTAssertEqual(after.body[attribute: "condition"], "item-not-found")
        await tcp.close()
    }

    func testAPythonBOSHClientTalksToSlixmppOverTCP() throws {
        // Independent clients on both ends: Python's standard library over BOSH (SCRAM-SHA-1), slixmpp over TLS.
        let interop = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Interop")
        let (echo, output) = try ServerProcess.slixmppEcho(port: Self.server.directTLSPort, jid: "bosh2@localhost", password: "pw2", count: 3)
        defer { if echo.isRunning { echo.terminate() } }
        XCTAssertTrue(output.contains("READY"), output)
        let (status, result) = try ServerProcess.run("/usr/bin/env", [
            "python3", interop.appendingPathComponent("bosh_client.py").path, "--url", "http://127.0.0.1:\(port)/http-bind",
            "--username", "bosh1", "--password", "pw1", "--peer", "bosh2@localhost", "--count", "3", "--forwarded-proto", "https",
        ])
        XCTAssertEqual(status, 0, result)
        XCTAssertTrue(result.hasPrefix("OK bosh1@localhost/"), result)
        echo.waitUntilExit()
        XCTAssertEqual(echo.terminationStatus, 0)
    }

    func testRequestsAreProcessedInRIDOrderAndAnswersReplayed() async throws {
        let bosh = Client(port: port)
        _ = try await bosh.login("bosh3", "pw3", resource: "r")
        // The later request arrives first: it waits for the missing one, and the stanzas stay in order.
        let peer = try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "bosh2", password: "pw2", resource: "order")
        let first = bosh.rid + 1, second = bosh.rid + 2
        bosh.rid = second
        async let late = bosh.post("<message xmlns='jabber:client' to='bosh2@localhost/order' type='chat'><body>two</body></message>", rid: second)
        try await Task.sleep(for: .milliseconds(200))
        _ = try await bosh.post("<message xmlns='jabber:client' to='bosh2@localhost/order' type='chat'><body>one</body></message>", rid: first)
        _ = try await late
        let one = try await peer.expect("one") { $0.name == "message" }
        let two = try await peer.expect("two") { $0.name == "message" }
        XCTAssertEqual([one.child("body")?.text, two.child("body")?.text], ["one", "two"])
        await peer.close()

        // The same rid again (its connection died): the same answer, nothing sent twice.
        let last = bosh.rid
        let lastAnswer = try await bosh.post(rid: last)
        let replayed = try await bosh.post(rid: last)
        XCTAssertEqual(lastAnswer.body.serialized(), replayed.body.serialized())

        // A rid beyond the window ends the session.
        let far = try await bosh.post(rid: bosh.rid + 10)
        XCTAssertEqual(far.body[attribute: "type"], "terminate")
        XCTAssertEqual(far.body[attribute: "condition"], "item-not-found")
    }

    func testUnknownSessionsAndBadBodiesAreRefused() async throws {
        let bosh = Client(port: port)
        bosh.sid = "0123456789abcdef0123456789abcdef"
        let unknown = try await bosh.post()
        XCTAssertEqual(unknown.status, 404)
        XCTAssertEqual(unknown.body[attribute: "condition"], "item-not-found")

        var request = URLRequest(url: bosh.url)
        request.httpMethod = "POST"
        request.httpBody = Data("<body xmlns='\(Self.namespace)'>no rid".utf8)
        let (_, response) = try await URLSession.shared.data(for: request)
        XCTAssertEqual((response as? HTTPURLResponse)?.statusCode, 400)

        let noDomain = Client(port: port)
        let refused = try await noDomain.post(attributes: " wait='10' hold='1'")
        XCTAssertEqual(refused.body[attribute: "condition"], "improper-addressing")
    }

    func testTheServerEndingTheStreamTerminatesTheSession() async throws {
        // A second login with the same resource replaces the BOSH session (<conflict/>): its next request
        // learns that the stream ended, with the stream error.
        let bosh = Client(port: port)
        _ = try await bosh.login("bosh4", "pw4", resource: "same")
        let replacing = try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "bosh4", password: "pw4", resource: "same")
        var answer = try await bosh.post()
        for _ in 0..<5 where answer.body[attribute: "type"] != "terminate" { answer = try await bosh.post() }
        XCTAssertEqual(answer.body[attribute: "type"], "terminate", answer.body.serialized())
        XCTAssertEqual(answer.body[attribute: "condition"], "remote-stream-error", answer.body.serialized())
        XCTAssertNotNil(answer.body.child("error")?.child("conflict"), answer.body.serialized())
        await replacing.close()
    }
}
