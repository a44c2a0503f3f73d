import Foundation
import NIOConcurrencyHelpers

/// Counts failed logins per client address so repeat offenders wait longer for each answer
/// (RFC 6120 §13.8 asks servers to resist password guessing).
public final class AuthFailureTracker: Sendable {
    private struct Entry {
        var count: Int
        var windowStart: Date
    }

    private let baseDelay: Double
    private let threshold: Int
    private let window: Double
    private let maxDelay = 30.0
    private let entries = NIOLockedValueBox<[String: Entry]>([:])

    public init(baseDelay: Double, threshold: Int, window: Double) {
        self.baseDelay = baseDelay
        self.threshold = threshold
        self.window = window
    }

    /// Records one failure and returns how many seconds to wait before answering it.
    public func recordFailure(address: String, now: Date = Date()) -> Double {
        let count = entries.withLockedValue { entries -> Int in
            if entries.count > 100_000 {
                // Bounded memory under a distributed attack: forget expired entries.
                entries = entries.filter { now.timeIntervalSince($0.value.windowStart) < window }
            }
            var entry = entries[address] ?? Entry(count: 0, windowStart: now)
            if now.timeIntervalSince(entry.windowStart) >= window { entry = Entry(count: 0, windowStart: now) }
            entry.count += 1
            entries[address] = entry
            return entry.count
        }
        guard count > threshold else { return baseDelay }
        return min(maxDelay, max(baseDelay, 0.25) * pow(2, Double(count - threshold)))
    }
}
