import Foundation
@testable import StarlingServer
import XCTest

/// Password guessing: per address the answers slow down; per account, many addresses are stopped
/// after a few guesses while addresses the account used before still get in.
final class AuthFailureTrackerTests: XCTestCase {
    func testAnAccountUnderAttackIsClosedToNewAddressesOnlyForTheWindow() {
        let tracker = AuthFailureTracker(baseDelay: 0, threshold: 100, window: 300, accountThreshold: 3)
        let start = Date(timeIntervalSince1970: 1_000_000)
        tracker.recordSuccess(address: "10.0.0.1", account: "alice@example.org")
        for bot in 1...3 {
            XCTAssertFalse(tracker.isLockedOut(account: "alice@example.org", address: "192.0.2.\(bot)", now: start))
            _ = tracker.recordFailure(address: "192.0.2.\(bot)", account: "alice@example.org", now: start)
        }
        XCTAssertTrue(tracker.isLockedOut(account: "alice@example.org", address: "192.0.2.99", now: start), "a fourth address is refused")
        XCTAssertFalse(tracker.isLockedOut(account: "alice@example.org", address: "10.0.0.1", now: start), "the owner's address still may try")
        XCTAssertFalse(tracker.isLockedOut(account: "bob@example.org", address: "192.0.2.99", now: start), "other accounts are not affected")
        XCTAssertFalse(tracker.isLockedOut(account: "alice@example.org", address: "192.0.2.99", now: start.addingTimeInterval(301)),
                       "the lock ends with the window")
    }

    func testOffAtZeroAndAddressDelaysStillGrow() {
        let tracker = AuthFailureTracker(baseDelay: 1, threshold: 2, window: 300, accountThreshold: 0)
        let now = Date()
        let delays = (1...4).map { _ in tracker.recordFailure(address: "192.0.2.1", account: "a@b", now: now) }
        XCTAssertEqual(delays, [1, 1, 2, 4])
        XCTAssertFalse(tracker.isLockedOut(account: "a@b", address: "192.0.2.2", now: now))
    }
}

/// What one client address may hold and open.
final class AddressLimitsTests: XCTestCase {
    func testRateConnectionsAndUnauthenticatedCaps() {
        let limits = AddressLimits(maxUnauthenticated: 2, maxConnections: 3, rate: 1, burst: 3)
        XCTAssertNil(limits.open("192.0.2.1", now: 0))
        XCTAssertNil(limits.open("192.0.2.1", now: 0))
        XCTAssertEqual(limits.open("192.0.2.1", now: 0), .unauthenticated, "two are waiting to authenticate")
        limits.authenticated("192.0.2.1")
        XCTAssertNil(limits.open("192.0.2.1", now: 0))
        XCTAssertEqual(limits.open("192.0.2.1", now: 0), .rate, "the burst of three is spent")
        XCTAssertNil(limits.open("192.0.2.2", now: 0), "other addresses are not affected")
        limits.authenticated("192.0.2.1")
        XCTAssertEqual(limits.open("192.0.2.1", now: 5), .connections, "three are open")
        limits.closed("192.0.2.1", authenticated: true)
        XCTAssertNil(limits.open("192.0.2.1", now: 6))
    }

    func testZeroMeansNoLimit() {
        let limits = AddressLimits(maxUnauthenticated: 0, maxConnections: 0, rate: 0, burst: 1)
        for _ in 1...1_000 { XCTAssertNil(limits.open("192.0.2.1", now: 0)) }
    }
}
