import NIOCore
import NIOWebSocket
import StarlingAPI
@testable import StarlingHTTP
@testable import StarlingServer
import StarlingXML
import XCTest

/// RFC 7395 framing: the c2s machine's `<open/>`, `<close/>`, features and errors, and how frames are read.
final class WebSocketFramingTests: XCTestCase {
    let settings = C2SSettings(hosts: ["example.com"], defaultHost: "example.com",
                               mechanisms: ["SCRAM-SHA-256", "PLAIN"], tlsRequired: true, offersStartTLS: false)

    func open(to: String = "example.com", namespace: String = C2SFraming.namespace) -> XMLElement {
        XMLElement(name: "open", namespace: namespace, attributes: ["to": to, "version": "1.0"])
    }

    func texts(_ actions: [C2SStateMachine.Action]) -> [String] {
        actions.compactMap { if case .send(let text) = $0 { return text } else { return nil } }
    }

    func testOpenIsAnsweredWithOpenAndSelfContainedFeatures() {
        var machine = C2SStateMachine(settings: settings, tlsActive: true, framing: .webSocket, streamID: { "w1" })
        let sent = texts(machine.streamOpened(header: open(), defaultNamespace: nil))
        XCTAssertEqual(sent.first, "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' id='w1' from='example.com' version='1.0' xml:lang='en'/>")
        XCTAssertEqual(sent.count, 2)
        XCTAssertTrue(sent[1].hasPrefix("<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms"), sent[1])
        XCTAssertTrue(sent[1].contains("<mechanism>PLAIN</mechanism>"), "TLS (at the listener or proxy) allows PLAIN")
        XCTAssertFalse(sent[1].contains("starttls"))
    }

    func testAStreamHeaderIsTheWrongOpeningOnAWebSocket() {
        var machine = C2SStateMachine(settings: settings, tlsActive: true, framing: .webSocket, streamID: { "w1" })
        var header = XMLElement(name: "stream", namespace: Namespace.stream, attributes: ["to": "example.com", "version": "1.0"])
        header.prefix = "stream"
        let actions = machine.streamOpened(header: header, defaultNamespace: Namespace.client)
        let sent = texts(actions)
        XCTAssertEqual(sent.count, 3, "<open/>, the error, <close/>")
        XCTAssertTrue(sent[1].hasPrefix("<stream:error xmlns:stream='http://etherx.jabber.org/streams'><invalid-namespace"), sent[1])
        XCTAssertEqual(sent[2], "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")
        XCTAssertEqual(actions.last, .close)
    }

    func testCloseIsAnsweredWithClose() {
        var machine = C2SStateMachine(settings: settings, tlsActive: true, framing: .webSocket)
        _ = machine.streamOpened(header: open(), defaultNamespace: nil)
        XCTAssertEqual(machine.streamClosed(), [.send("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"), .close])
    }

    func testTCPStreamsAreUnchanged() {
        var machine = C2SStateMachine(settings: settings, tlsActive: true)
        var header = XMLElement(name: "stream", namespace: Namespace.stream, attributes: ["to": "example.com", "version": "1.0"])
        header.prefix = "stream"
        let sent = texts(machine.streamOpened(header: header, defaultNamespace: Namespace.client))
        XCTAssertTrue(sent[0].hasPrefix("<?xml version='1.0'?><stream:stream "), sent[0])
        XCTAssertTrue(sent[1].hasPrefix("<stream:features><mechanisms"), sent[1])
        XCTAssertEqual(machine.streamClosed(), [.send("</stream:stream>"), .close])
    }

    func frame(_ opcode: WebSocketOpcode, _ text: String, masked: Bool = true) -> WebSocketFrame {
        var data = ByteBuffer(string: text)
        let key: WebSocketMaskingKey? = masked ? [1, 2, 3, 4] : nil
        if let key { data.webSocketMask(key) }
        return WebSocketFrame(fin: true, opcode: opcode, maskKey: key, data: data)
    }

    func testTextFramesAreElementsWithoutTheirXMLDeclaration() {
        XCTAssertEqual(InboundFrameMeaning.of(frame(.text, "<message/>")), .element(ByteBuffer(string: "<message/>")))
        XCTAssertEqual(InboundFrameMeaning.of(frame(.text, "\n<?xml version='1.0'?><open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")),
                       .element(ByteBuffer(string: "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")))
        XCTAssertEqual(InboundFrameMeaning.of(frame(.text, "<?xml version='1.0'?>")), .nothing)
        // Not a declaration: left to the parser, which refuses processing instructions.
        XCTAssertEqual(InboundFrameMeaning.of(frame(.text, "<?xml-stylesheet x?><a/>")).isElement, true)
    }

    func testControlAndBinaryFrames() {
        XCTAssertEqual(InboundFrameMeaning.of(frame(.ping, "hi")), .ping(ByteBuffer(string: "hi")))
        XCTAssertEqual(InboundFrameMeaning.of(frame(.pong, "")), .nothing)
        XCTAssertEqual(InboundFrameMeaning.of(frame(.connectionClose, "")), .close)
        XCTAssertEqual(InboundFrameMeaning.of(frame(.binary, "<message/>")), .refuse(.unacceptableData))
    }
}

private extension InboundFrameMeaning {
    var isElement: Bool { if case .element = self { return true } else { return false } }
}
