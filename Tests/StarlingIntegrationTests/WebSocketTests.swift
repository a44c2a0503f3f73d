import Foundation
import HTTPTypes
import StarlingAPI
import StarlingSASL
import StarlingTestClient
import XCTest
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// XMPP over WebSocket (RFC 7395) and XEP-0156 on an HTTP listener of the real server, with
/// Hummingbird's WebSocket client, alongside TCP clients of the same server.
final class WebSocketTests: XCTestCase {
    static let users = (1...6).map { ("ws\($0)", "pw\($0)") }
    nonisolated(unsafe) static var server: ServerProcess!
    nonisolated(unsafe) static var startFailure: (any Error)?
    /// What a TLS-terminating proxy on this machine adds to the upgrade request.
    static let proxied: HTTPFields = [HTTPField.Name("X-Forwarded-Proto")!: "https", HTTPField.Name("X-Forwarded-For")!: "192.0.2.7"]

    override class func setUp() {
        super.setUp()
        do { server = try ServerProcess(extraConfig: """
        modules:
          disco: {}
          roster: {}
          presence: {}
          offline: {}
          stream_management: { resume_timeout: 30 }
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

    private var url: String { "ws://127.0.0.1:\(Self.server.httpPort)/xmpp-websocket" }

    private func tcpLogin(_ number: Int, resource: String = "tcp") async throws -> TestClient {
        try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "ws\(number)", password: "pw\(number)",
                                   resource: resource)
    }

    func testLoginRosterAndMessagesBothWaysWithATCPClient() async throws {
        let web = WebSocketSession(url: url, headers: Self.proxied)
        let jid = try await web.login(username: "ws1", password: "pw1", resource: "browser")
        XCTAssertEqual(jid, "ws1@localhost/browser")

        web.send("<iq xmlns='jabber:client' type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>")
        let roster = try await web.expect("roster") { $0.name == "iq" && $0[attribute: "id"] == "roster" }
        XCTAssertEqual(roster[attribute: "type"], "result", roster.serialized())

        let tcp = try await tcpLogin(2)
        web.send("<message xmlns='jabber:client' to='ws2@localhost/tcp' type='chat' id='w1'><body>from the browser</body></message>")
        let atTCP = try await tcp.expect("message from the WebSocket") { $0.name == "message" }
        XCTAssertEqual(atTCP[attribute: "from"], "ws1@localhost/browser")
        XCTAssertEqual(atTCP.child("body")?.text, "from the browser")

        tcp.send("<message to='ws1@localhost/browser' type='chat' id='t1'><body>from TCP</body></message>")
        // Each message is a document of its own: the stanza declares its namespace.
        var raw = ""
        while !raw.contains("from TCP") { raw = try await web.nextText("the TCP client's message") }
        XCTAssertTrue(raw.hasPrefix("<message"), raw)
        XCTAssertTrue(raw.contains("xmlns='jabber:client'"), raw)
        XCTAssertTrue(raw.contains("from='ws2@localhost/tcp'"), raw)

        // <close/> is answered with <close/>.
        web.send("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")
        let closed = try await web.expect("<close/>") { $0.name == "close" }
        XCTAssertEqual(closed.namespace, "urn:ietf:params:xml:ns:xmpp-framing")
        await web.finish()
        await tcp.close()
    }

    /// A web client's FAST (XEP-0484) path: behind a TLS-terminating proxy only HT-SHA-256-NONE is offered
    /// (the browser cannot see TLS), a SASL2 password login asks for a token, and the next session logs in
    /// with the token alone, bound in the same round trip.
    func testAWebClientLogsInWithAFASTToken() async throws {
        func authenticate(_ web: WebSocketSession, mechanism: String, initial: [UInt8], extra: String) async throws -> (XMLElement, [String]) {
            web.open()
            _ = try await web.expect("<open/>") { $0.name == "open" }
            let features = try await web.expect("features") { $0.name == "features" }
            let fast = features.child("authentication", namespace: "urn:xmpp:sasl:2")?.child("inline")?.child("fast", namespace: "urn:xmpp:fast:0")
            web.send("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='\(mechanism)'><initial-response>\(Data(initial).base64EncodedString())"
                     + "</initial-response><user-agent id='browser-tab-1'/>\(extra)</authenticate>")
            let outcome = try await web.next("SASL2 outcome")
            return (outcome, fast?.elements.map(\.text) ?? [])
        }
        let first = WebSocketSession(url: url, headers: Self.proxied)
        let (success, offered) = try await authenticate(first, mechanism: "PLAIN", initial: Array("\0ws6\0pw6".utf8),
                                                        extra: "<request-token xmlns='urn:xmpp:fast:0' mechanism='HT-SHA-256-NONE'/>")
        XCTAssertEqual(offered, ["HT-SHA-256-NONE"], "no certificate binding over a proxied WebSocket")
        let token = try XCTUnwrap(TestClient.fastToken(in: success), success.serialized()).token
        await first.finish()

        let second = WebSocketSession(url: url, headers: Self.proxied)
        let initial = HashedTokenMechanism.initialResponse(username: "ws6", token: token, channelBinding: [])
        let (outcome, _) = try await authenticate(second, mechanism: "HT-SHA-256-NONE", initial: initial,
                                                  extra: "<fast xmlns='urn:xmpp:fast:0'/><bind xmlns='urn:xmpp:bind:0'><tag>Web</tag></bind>")
        XCTAssertEqual(outcome.name, "success", outcome.serialized())
        XCTAssertNotNil(outcome.child("bound", namespace: "urn:xmpp:bind:0"), outcome.serialized())
        let proof = Array(Data(base64Encoded: outcome.child("additional-data")?.text ?? "") ?? Data())
        XCTAssertEqual(proof, HashedTokenMechanism.responderProof(token: token, channelBinding: []), "the server proves it knew the token")
        await second.finish()
    }

    func testStreamHeaderAndFeaturesAreFramed() async throws {
        let web = WebSocketSession(url: url, headers: Self.proxied)
        web.send("<?xml version='1.0'?><open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>")
        let opened = try await web.nextText("<open/>")
        XCTAssertTrue(opened.hasPrefix("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'"), opened)
        XCTAssertTrue(opened.contains("from='localhost'") && opened.contains("version='1.0'") && opened.hasSuffix("/>"), opened)
        let features = try await web.nextText("features")
        XCTAssertTrue(features.hasPrefix("<stream:features xmlns:stream='http://etherx.jabber.org/streams'>"), features)
        // A proxy that terminated TLS vouched for this one: PLAIN is offered, STARTTLS is not.
        XCTAssertTrue(features.contains("<mechanism>PLAIN</mechanism>"), features)
        XCTAssertFalse(features.contains("starttls"), features)
        await web.finish()
    }

    func testWithoutTLSAnywherePlainIsNotOffered() async throws {
        // Straight to the listener, no proxy: the connection is plaintext.
        let web = WebSocketSession(url: url)
        web.open()
        _ = try await web.expect("<open/>") { $0.name == "open" }
        let features = try await web.expect("features") { $0.name == "features" }
        let mechanisms = features.child("mechanisms")?.elements.map(\.text) ?? []
        XCTAssertFalse(mechanisms.contains("PLAIN"), features.serialized())
        let credentials = Data("\0ws3\0pw3".utf8).base64EncodedString()
        web.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(credentials)</auth>")
        let outcome = try await web.next("SASL outcome")
        XCTAssertNotEqual(outcome.name, "success", outcome.serialized())
        await web.finish()
    }

    func testForwardedHeadersCountOnlyFromTrustedProxies() async throws {
        // The listener trusts 127.0.0.1 and the client says it is 192.0.2.7: the log names the client.
        let web = WebSocketSession(url: url, headers: Self.proxied)
        web.open()
        _ = try await web.expect("<open/>") { $0.name == "open" }
        web.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(Data("\0ws4\0wrong".utf8).base64EncodedString())</auth>")
        let failure = try await web.expect("SASL failure") { $0.name == "failure" }
        XCTAssertNotNil(failure.child("not-authorized"), failure.serialized())
        let log = try String(contentsOfFile: Self.server.errorLogPath, encoding: .utf8)
        XCTAssertTrue(log.contains("address=192.0.2.7"), "the failed login is logged with the forwarded address")
        await web.finish()
    }

    func testBadXMLGetsAFramedStreamErrorAndClose() async throws {
        let web = WebSocketSession(url: url, headers: Self.proxied)
        web.open()
        _ = try await web.expect("features") { $0.name == "features" }
        web.send("<message><unclosed></message>")
        let error = try await web.nextText("stream error")
        XCTAssertTrue(error.hasPrefix("<stream:error xmlns:stream='http://etherx.jabber.org/streams'>"), error)
        XCTAssertTrue(error.contains("not-well-formed"), error)
        let close = try await web.nextText("<close/>")
        XCTAssertEqual(close, "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")
        await web.finish()
    }

    func testUpgradeWithoutTheXMPPSubprotocolIsRefused() async throws {
        let web = WebSocketSession(url: url, headers: Self.proxied, offerXMPP: false)
        do {
            let text = try await web.nextText("anything", timeout: 10)
            XCTFail("the server accepted a WebSocket without the xmpp subprotocol and sent \(text)")
        } catch WebSocketSession.Failure.closed {
            // Refused with 400 before any WebSocket message.
        }
        await web.finish()
    }

    func testAWebSocketSessionResumesOverTCP() async throws {
        // A browser tab that loses its connection: stream management works as on TCP, across transports.
        let web = WebSocketSession(url: url, headers: Self.proxied)
        _ = try await web.login(username: "ws5", password: "pw5", resource: "tab")
        web.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        let enabled = try await web.expect("enabled") { $0.name == "enabled" }
        let id = try XCTUnwrap(enabled[attribute: "id"])
        await web.finish()  // no <close/>: the connection just goes

        let sender = try await tcpLogin(6)
        sender.send("<message to='ws5@localhost/tab' type='chat'><body>while you were away</body></message>")
        // The message reaches the detached session (it is still bound) before the client comes back.
        sender.send("<iq type='get' id='ping'><ping xmlns='urn:xmpp:ping'/></iq>")
        _ = try await sender.expect("ping result") { $0[attribute: "id"] == "ping" }

        let back = try await TestClient.connect(port: Self.server.directTLSPort, domain: "localhost", tls: .direct)
        _ = try await back.openStream()
        try await back.authenticate(username: "ws5", password: "pw5", mechanism: "SCRAM-SHA-256")
        back.send("<resume xmlns='urn:xmpp:sm:3' previd='\(id)' h='0'/>")
        let resumed = try await back.expect("resumed") { $0.name == "resumed" || $0.name == "failed" }
        XCTAssertEqual(resumed.name, "resumed", resumed.serialized())
        let message = try await back.expect("the message held for the session") { $0.name == "message" }
        XCTAssertEqual(message.child("body")?.text, "while you were away")
        await back.close()
        await sender.close()
    }

    func testHostMetaAdvertisesTheWebSocketEndpoint() async throws {
        let base = "http://127.0.0.1:\(Self.server.httpPort)"
        let (xmlData, xmlResponse) = try await URLSession.shared.data(from: URL(string: "\(base)/.well-known/host-meta")!)
        let xml = String(decoding: xmlData, as: UTF8.self)
        XCTAssertEqual((xmlResponse as? HTTPURLResponse)?.statusCode, 200)
        XCTAssertEqual((xmlResponse as? HTTPURLResponse)?.value(forHTTPHeaderField: "Access-Control-Allow-Origin"), "*")
        XCTAssertTrue(xml.contains("rel='urn:xmpp:alt-connections:websocket' href='ws://127.0.0.1:\(Self.server.httpPort)/xmpp-websocket'"), xml)
        XCTAssertTrue(xml.contains("rel='urn:xmpp:alt-connections:xbosh' href='http://127.0.0.1:\(Self.server.httpPort)/http-bind'"), xml)

        var request = URLRequest(url: URL(string: "\(base)/.well-known/host-meta.json")!)
        request.setValue("https", forHTTPHeaderField: "X-Forwarded-Proto")
        request.setValue("chat.example.test", forHTTPHeaderField: "Host")
        let (jsonData, _) = try await URLSession.shared.data(for: request)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: jsonData) as? [String: Any])
        let links = try XCTUnwrap(json["links"] as? [[String: String]])
        XCTAssertEqual(links.first?["rel"], "urn:xmpp:alt-connections:websocket")
        // Behind a trusted proxy that terminated TLS, for the host the client asked for.
        XCTAssertEqual(links.first?["href"], "wss://chat.example.test/xmpp-websocket")
        XCTAssertEqual(links.last?["rel"], "urn:xmpp:alt-connections:xbosh")
        XCTAssertEqual(links.last?["href"], "https://chat.example.test/http-bind")

        let (_, missing) = try await URLSession.shared.data(from: URL(string: "\(base)/no-such-thing")!)
        XCTAssertEqual((missing as? HTTPURLResponse)?.statusCode, 404)
        let (_, notUpgraded) = try await URLSession.shared.data(from: URL(string: "\(base)/xmpp-websocket")!)
        XCTAssertEqual((notUpgraded as? HTTPURLResponse)?.statusCode, 426)
    }
}
