import Dispatch
import NIOConcurrencyHelpers

/// What one client address may hold and open: connections before authentication (a slow-loris holds
/// many without ever finishing the handshake), connections in all, and new connections per second (a
/// token bucket). Behind a load balancer this needs the PROXY protocol, or every client is the balancer.
public final class AddressLimits: Sendable {
    /// Why a new connection was refused.
    public enum Refusal: String, Sendable {
        case rate = "connecting too fast from this address"
        case connections = "too many connections from this address"
        case unauthenticated = "too many unauthenticated connections from this address"
    }

    private struct Entry {
        var open = 0
        var unauthenticated = 0
        var tokens: Double
        var refilledAt: Double
    }

    private let maxUnauthenticated: Int
    private let maxConnections: Int
    private let rate: Double
    private let burst: Double
    private let entries = NIOLockedValueBox<[String: Entry]>([:])
    /// Idle addresses are forgotten beyond this many (their rate state with them).
    private let bound = 100_000

    /// A limit of 0 (and a rate of 0) is no limit.
    init(maxUnauthenticated: Int, maxConnections: Int, rate: Double, burst: Int) {
        self.maxUnauthenticated = maxUnauthenticated
        self.maxConnections = maxConnections
        self.rate = rate
        self.burst = Double(burst)
    }

    /// Counts a new connection from `address` (open and not yet authenticated), or says why not (and
    /// counts nothing). `now` is in seconds on a monotonic clock.
    func open(_ address: String, now: Double = Double(DispatchTime.now().uptimeNanoseconds) / 1e9) -> Refusal? {
        entries.withLockedValue { entries in
            if entries.count > bound { entries = entries.filter { $0.value.open > 0 } }
            var entry = entries[address] ?? Entry(tokens: burst, refilledAt: now)
            if rate > 0 {
                entry.tokens = min(burst, entry.tokens + (now - entry.refilledAt) * rate)
                entry.refilledAt = now
                guard entry.tokens >= 1 else {
                    entries[address] = entry
                    return .rate
                }
            }
            if maxConnections > 0, entry.open >= maxConnections { return .connections }
            if maxUnauthenticated > 0, entry.unauthenticated >= maxUnauthenticated { return .unauthenticated }
            if rate > 0 { entry.tokens -= 1 }
            entry.open += 1
            entry.unauthenticated += 1
            entries[address] = entry
            return nil
        }
    }

    /// A connection `open` counted has authenticated.
    func authenticated(_ address: String) {
        entries.withLockedValue { entries in
            guard var entry = entries[address] else { return }
            entry.unauthenticated = max(0, entry.unauthenticated - 1)
            entries[address] = entry
        }
    }

    /// A connection `open` counted has closed.
    func closed(_ address: String, authenticated: Bool) {
        entries.withLockedValue { entries in
            guard var entry = entries[address] else { return }
            entry.open = max(0, entry.open - 1)
            if !authenticated { entry.unauthenticated = max(0, entry.unauthenticated - 1) }
            // Kept while its rate still matters: a full bucket says nothing an absent entry would not.
            if entry.open == 0, rate == 0 || entry.tokens >= burst - 1 { entries[address] = nil } else { entries[address] = entry }
        }
    }
}
