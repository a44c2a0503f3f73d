import StarlingAPI
@testable import StarlingServer
import XCTest

/// XEP-0198's counting as a plain value.
final class StreamManagementCountingTests: XCTestCase {
    private let stanza = OutgoingStanza.element(XMLElement(name: "message", namespace: Namespace.client))

    func testNothingIsCountedUntilEnabled() {
        var sm = StreamManagement()
        sm.received()
        XCTAssertTrue(sm.sending(stanza, limit: 1))
        XCTAssertEqual(sm.handled, 0)
        XCTAssertEqual(sm.sent, 0)
        XCTAssertTrue(sm.unacknowledged.isEmpty)
    }

    func testAcknowledgementsForgetWhatTheyCoverAndRefuseTooMuch() {
        var sm = StreamManagement()
        sm.enable(resumable: true)
        for _ in 1...3 { XCTAssertTrue(sm.sending(stanza, limit: 10)) }
        sm.received()
        XCTAssertEqual(sm.handled, 1)
        XCTAssertTrue(sm.acknowledge(2))
        XCTAssertEqual(sm.unacknowledged.count, 1)
        XCTAssertTrue(sm.acknowledge(2), "the same h again changes nothing")
        XCTAssertFalse(sm.acknowledge(4), "four were never sent")
        XCTAssertTrue(sm.acknowledge(3))
        XCTAssertTrue(sm.unacknowledged.isEmpty)
        for _ in 1...3 { _ = sm.sending(stanza, limit: 2) }
        XCTAssertFalse(sm.sending(stanza, limit: 2), "past the queue's bound")
    }

    func testCountersWrapAt2To32() {
        var sm = StreamManagement()
        sm.enable(resumable: false)
        // Acknowledge up to just below the wrap, one stanza at a time in big steps.
        var h: UInt32 = 0
        for _ in 0..<4 {
            for _ in 0..<3 { _ = sm.sending(stanza, limit: 10) }
            h &+= 3
            XCTAssertTrue(sm.acknowledge(h))
        }
        XCTAssertEqual(sm.sent, 12)
        // Counting on past 2^32 - 1 wraps to 0, and acknowledgements follow.
        var wrapped = StreamManagement()
        wrapped.enable(resumable: false)
        wrapped.sent = UInt32.max - 1
        for _ in 0..<3 { _ = wrapped.sending(stanza, limit: 10) }
        XCTAssertEqual(wrapped.sent, 1)
        XCTAssertTrue(wrapped.acknowledge(0), "two of three acknowledged across the wrap")
        XCTAssertEqual(wrapped.unacknowledged.count, 1)
        XCTAssertTrue(wrapped.acknowledge(1))
        XCTAssertTrue(wrapped.unacknowledged.isEmpty)
    }

    func testEnableRequestsAndAcknowledgementsAsAnswers() {
        var sm = StreamManagement()
        func element(_ name: String, _ attributes: [String: String] = [:]) -> XMLElement {
            XMLElement(name: name, namespace: StreamManagement.namespace, attributes: attributes)
        }
        XCTAssertEqual(sm.received(element("enable"), resumeTimeout: nil, newID: { "x" }), .send(StreamManagement.failed(.featureNotImplemented)),
                       "the module is off on this host")
        XCTAssertEqual(sm.received(element("r"), resumeTimeout: 300, newID: { "x" }),
                       .streamError(.unsupportedStanzaType, "<r xmlns='urn:xmpp:sm:3'/> is not expected now"), "not enabled yet")
        XCTAssertEqual(sm.received(element("enable", ["resume": "true"]), resumeTimeout: 300, newID: { "id1" }),
                       .send(element("enabled", ["id": "id1", "resume": "true", "max": "300"])))
        XCTAssertEqual(sm.id, "id1")
        XCTAssertEqual(sm.received(element("enable"), resumeTimeout: 300, newID: { "x" }), .send(StreamManagement.failed(.unexpectedRequest)))
        sm.received()
        XCTAssertEqual(sm.received(element("r"), resumeTimeout: 300, newID: { "x" }), .send(element("a", ["h": "1"])))
        _ = sm.sending(stanza, limit: 10)
        XCTAssertEqual(sm.received(element("a", ["h": "1"]), resumeTimeout: 300, newID: { "x" }), .nothing)
        XCTAssertEqual(sm.received(element("a", ["h": "2"]), resumeTimeout: 300, newID: { "x" }),
                       .streamError(.undefinedCondition, "that acknowledges stanzas never sent"))

        var noResume = StreamManagement()
        XCTAssertEqual(noResume.received(element("enable", ["resume": "true"]), resumeTimeout: 0, newID: { "x" }), .send(element("enabled")),
                       "resumption off: enabled without an id")
        XCTAssertFalse(noResume.resumable)
    }
}
