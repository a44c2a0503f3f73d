@testable import StarlingHTTP
import XCTest

/// XEP-0124's request scheduling, event by event.
final class BOSHSessionMachineTests: XCTestCase {
    typealias Machine = BOSHSessionMachine
    let header = "<stream:stream to='example.com'>"

    func machine(hold: Int = 1, maxPending: Int = 1_000) -> Machine {
        var machine = Machine(settings: .init(wait: 30, hold: hold, inactivity: 60, maxPendingBytes: maxPending), streamHeader: header, firstRID: 10)
        machine.creationAttributes = " sid='s'"
        return machine
    }

    func request(_ rid: Int64, _ elements: [String] = [], restart: Bool = false, terminate: Bool = false) -> Machine.Request {
        .init(rid: rid, elements: elements, restart: restart, terminate: terminate)
    }

    func testARequestIsHeldUntilOutputAndTheFirstAnswerCreatesTheSession() {
        var m = machine()
        XCTAssertEqual(m.received(1, request(10, [header])), [.forward(header), .stopInactivity, .startWait(1, seconds: 30)])
        XCTAssertEqual(m.output("<features/>"), [.respond(1, Machine.body(["<features/>"], attributes: " sid='s'")), .startInactivity(seconds: 60)])
        // Later answers do not repeat the session attributes; output without a held request waits for one.
        XCTAssertEqual(m.output("<a/>"), [])
        XCTAssertEqual(m.received(2, request(11)), [.stopInactivity, .respond(2, Machine.body(["<a/>"])), .startInactivity(seconds: 60)])
    }

    func testMoreThanHoldRequestsAnswerTheOldestAndWaitsExpire() {
        var m = machine()
        _ = m.received(1, request(10))
        let second = m.received(2, request(11, ["<message/>"]))
        XCTAssertEqual(second, [.forward("<message/>"), .respond(1, Machine.body([], attributes: " sid='s'")), .startWait(2, seconds: 30)])
        XCTAssertEqual(m.waitExpired(2), [.respond(2, Machine.body()), .startInactivity(seconds: 60)])
        XCTAssertEqual(m.waitExpired(2), [], "answered already")
    }

    func testEarlyRequestsWaitForTheMissingOnesAndAnswersAreReplayed() {
        var m = machine()
        _ = m.received(1, request(10))
        _ = m.output("<x/>")
        XCTAssertEqual(m.received(3, request(12, ["<second/>"])), [], "rid 11 is missing: parked")
        let actions = m.received(2, request(11, ["<first/>"]))
        XCTAssertEqual(actions.compactMap { if case .forward(let text) = $0 { return text } else { return nil } }, ["<first/>", "<second/>"])
        // rid 10 was answered: asked again, the same answer, and nothing forwarded twice.
        XCTAssertEqual(m.received(4, request(10)), [.respond(4, Machine.body(["<x/>"], attributes: " sid='s'"))])
        // rid 12 is still held: asked again, the new request takes its place.
        XCTAssertEqual(m.received(5, request(12)), [.respond(3, Machine.body()), .startWait(5, seconds: 30)])
    }

    func testRIDsOutsideTheWindowEndTheSession() {
        var m = machine()
        _ = m.received(1, request(10))
        let actions = m.received(2, request(13))
        XCTAssertTrue(actions.contains(.forward("</stream:stream>")))
        XCTAssertTrue(actions.contains(.respond(2, Machine.terminateBody("item-not-found"))), "\(actions)")
        XCTAssertEqual(actions.last, .forget)
        XCTAssertTrue(m.ended)
    }

    func testRestartAndTerminate() {
        var m = machine()
        _ = m.received(1, request(10))
        XCTAssertEqual(m.received(2, request(11, restart: true)).first, .forward(header))
        let actions = m.received(3, request(12, ["<presence type='unavailable'/>"], terminate: true))
        XCTAssertEqual(Array(actions.prefix(2)), [.forward("<presence type='unavailable'/>"), .forward("</stream:stream>")])
        XCTAssertTrue(actions.contains(.respond(3, Machine.terminateBody(nil))))
        XCTAssertEqual(Array(actions.suffix(2)), [.closeStream, .forget])
    }

    func testAStreamErrorReachesTheNextRequestWhenNoneIsHeld() {
        var m = machine()
        _ = m.received(1, request(10))
        _ = m.waitExpired(1)
        _ = m.output("<stream:error><conflict/></stream:error>")
        XCTAssertEqual(m.streamClosed(error: true), [.closeStream, .startInactivity(seconds: 60)])
        XCTAssertEqual(m.received(2, request(11)), [.respond(2, Machine.terminateBody("remote-stream-error", payload: ["<stream:error><conflict/></stream:error>"])), .forget])
    }

    func testOutputNobodyFetchesIsBounded() {
        var m = machine(maxPending: 10)
        _ = m.received(1, request(10))
        _ = m.waitExpired(1)
        XCTAssertEqual(m.output("<12345/>"), [])
        let actions = m.output("<6789/>")
        XCTAssertTrue(actions.contains(.closeStream))
        XCTAssertTrue(m.ended)
    }

    func testInactivityEndsASessionWithoutRequests() {
        var m = machine()
        _ = m.received(1, request(10))
        XCTAssertEqual(m.inactivityExpired(), [], "a request is held")
        _ = m.waitExpired(1)
        XCTAssertEqual(m.inactivityExpired(), [.closeStream, .forget])
    }
}
