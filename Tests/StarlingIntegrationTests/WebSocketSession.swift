import Foundation
import HTTPTypes
import HummingbirdWSClient
import Logging
import StarlingAPI
import StarlingXML
import XCTest

/// An XMPP client over WebSocket (RFC 7395) for the tests, on Hummingbird's WebSocket client: each
/// message sent is one element, each message received is parsed on its own.
final class WebSocketSession: @unchecked Sendable {
    /// The raw text of each message the server sent, in order.
    private var received: AsyncStream<String>.AsyncIterator
    private let outgoing: AsyncStream<String>.Continuation
    private let connection: Task<WebSocketCloseFrame?, any Error>
    let domain: String

    enum Failure: Error, CustomStringConvertible {
        case closed(String)
        case timedOut(String)
        var description: String {
            switch self {
            case .closed(let what): return "connection closed while waiting for \(what)"
            case .timedOut(let what): return "timed out waiting for \(what)"
            }
        }
    }

    /// Opens the WebSocket; `headers` are sent with the upgrade request (a proxy's, say). The `xmpp`
    /// subprotocol is offered unless `offerXMPP` is false.
    init(url: String, domain: String = "localhost", headers: HTTPFields = [:], offerXMPP: Bool = true) {
        self.domain = domain
        let (incoming, delivered) = AsyncStream<String>.makeStream()
        let (toSend, outgoing) = AsyncStream<String>.makeStream()
        self.received = incoming.makeAsyncIterator()
        self.outgoing = outgoing
        var configuration = WebSocketClientConfiguration()
        configuration.additionalHeaders = headers
        if offerXMPP { configuration.additionalHeaders[.secWebSocketProtocol] = "xmpp" }
        configuration.maxFrameSize = 1 << 20
        connection = Task {
            defer { delivered.finish() }
            return try await WebSocketClient.connect(url: url, configuration: configuration, logger: Logger(label: "ws-test")) { inbound, outbound, _ in
                let writer = Task {
                    for await text in toSend { try await outbound.write(.text(text)) }
                }
                defer { writer.cancel() }
                for try await message in inbound.messages(maxSize: 1 << 20) {
                    if case .text(let text) = message { delivered.yield(text) }
                }
            }
        }
    }

    func send(_ text: String) {
        outgoing.yield(text)
    }

    /// The next message's raw text.
    func nextText(_ what: String = "a message", timeout: Double = 10) async throws -> String {
        let result = try await withThrowingTaskGroup(of: String?.self) { group in
            group.addTask { [self] in await self.received.next() }
            group.addTask {
                try await Task.sleep(for: .seconds(timeout))
                throw Failure.timedOut(what)
            }
            let first = try await group.next()!
            group.cancelAll()
            return first
        }
        guard let result else { throw Failure.closed(what) }
        return result
    }

    /// The next message as an element.
    func next(_ what: String = "an element", timeout: Double = 10) async throws -> XMLElement {
        let text = try await nextText(what, timeout: timeout)
        guard let element = XMLFragmentParser.parse(text, defaultNamespace: "") else {
            XCTFail("not an XML element: \(text)")
            throw Failure.closed(what)
        }
        return element
    }

    /// Skips messages until one matches.
    func expect(_ what: String, timeout: Double = 10, where matches: (XMLElement) -> Bool) async throws -> XMLElement {
        while true {
            let element = try await next(what, timeout: timeout)
            if matches(element) { return element }
        }
    }

    func open() {
        send("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='\(domain)' version='1.0'/>")
    }

    /// Opens the stream, logs in with PLAIN and binds `resource`; returns the full JID.
    func login(username: String, password: String, resource: String) async throws -> String {
        open()
        let opened = try await next("<open/>")
        XCTAssertEqual(opened.name, "open")
        _ = try await expect("features") { $0.name == "features" }
        let credentials = Data("\0\(username)\0\(password)".utf8).base64EncodedString()
        send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(credentials)</auth>")
        let outcome = try await next("SASL outcome")
        XCTAssertEqual(outcome.name, "success", outcome.serialized())
        open()
        _ = try await expect("<open/> after SASL") { $0.name == "open" }
        _ = try await expect("features after SASL") { $0.name == "features" }
        send("<iq xmlns='jabber:client' type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>\(resource)</resource></bind></iq>")
        let bound = try await expect("bind result") { $0.name == "iq" && $0[attribute: "id"] == "bind" }
        return bound.child("bind")?.child("jid")?.text ?? ""
    }

    /// Ends the WebSocket and waits until the connection is gone.
    func finish() async {
        outgoing.finish()
        connection.cancel()
        _ = try? await connection.value
    }
}
