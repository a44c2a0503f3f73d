import Foundation
import NIOConcurrencyHelpers

/// Counts failed logins per client address, so repeat offenders wait longer for each answer, and per
/// account, so that many addresses guessing one account's password (a botnet) are stopped after a few
/// guesses while its owner, from an address it logged in from before, still gets in (RFC 6120 §13.8
/// asks servers to resist password guessing).
public final class AuthFailureTracker: Sendable {
    private struct Entry {
        var count: Int
        var windowStart: Date
    }

    private struct State {
        var addresses: [String: Entry] = [:]
        var accounts: [String: Entry] = [:]
        /// Addresses each account logged in from (the most recent few).
        var trusted: [String: [String]] = [:]
    }

    private let baseDelay: Double
    private let threshold: Int
    private let window: Double
    private let accountThreshold: Int
    private let maxDelay = 30.0
    /// Entries kept before expired ones are forgotten (bounded memory under a distributed attack).
    private let bound = 100_000
    private let trustedPerAccount = 8
    private let state = NIOLockedValueBox(State())

    public init(baseDelay: Double, threshold: Int, window: Double, accountThreshold: Int = 0) {
        self.baseDelay = baseDelay
        self.threshold = threshold
        self.window = window
        self.accountThreshold = accountThreshold
    }

    /// Records one failure (for `account`, as `user@host`, when known) and returns how many seconds to
    /// wait before answering it.
    public func recordFailure(address: String, account: String? = nil, now: Date = Date()) -> Double {
        let count = state.withLockedValue { state -> Int in
            if let account { _ = Self.count(account, in: &state.accounts, now: now, window: window, bound: bound) }
            return Self.count(address, in: &state.addresses, now: now, window: window, bound: bound)
        }
        guard count > threshold else { return baseDelay }
        return min(maxDelay, max(baseDelay, 0.25) * pow(2, Double(count - threshold)))
    }

    /// Remembers that `account` logged in from `address`.
    public func recordSuccess(address: String, account: String) {
        state.withLockedValue { state in
            var addresses = state.trusted[account] ?? []
            guard !addresses.contains(address) else { return }
            if state.trusted.count >= bound { state.trusted.removeAll(keepingCapacity: true) }
            addresses.append(address)
            if addresses.count > trustedPerAccount { addresses.removeFirst(addresses.count - trustedPerAccount) }
            state.trusted[account] = addresses
        }
    }

    /// Whether `account` has failed too often lately for `address`, which it never logged in from, to try.
    public func isLockedOut(account: String, address: String, now: Date = Date()) -> Bool {
        guard accountThreshold > 0 else { return false }
        return state.withLockedValue { state in
            guard let entry = state.accounts[account], now.timeIntervalSince(entry.windowStart) < window, entry.count >= accountThreshold else { return false }
            return !(state.trusted[account]?.contains(address) ?? false)
        }
    }

    private static func count(_ key: String, in entries: inout [String: Entry], now: Date, window: Double, bound: Int) -> Int {
        if entries.count > bound { entries = entries.filter { now.timeIntervalSince($0.value.windowStart) < window } }
        var entry = entries[key] ?? Entry(count: 0, windowStart: now)
        if now.timeIntervalSince(entry.windowStart) >= window { entry = Entry(count: 0, windowStart: now) }
        entry.count += 1
        entries[key] = entry
        return entry.count
    }
}
