import Dispatch
import StarlingAPI

/// Rate limits, each a token bucket like ejabberd's shaper:
/// - per session, stanzas: `burst` at once and `rate` per second on average; beyond that stanzas are
///   refused with `<policy-violation/>` until the bucket refills;
/// - per client address, new connections: `connection_burst` at once, `connection_rate` per second;
///   beyond that connections are closed at once;
/// - per account, failed logins: after `login_failures` within `login_failure_window` seconds, further
///   attempts are refused until the window has passed.
/// Session buckets survive `starlingctl reload-module`.
public final class RateLimitsModule: ServerModule, StateHandoverModule {
    public static let descriptor = ModuleDescriptor(
        name: "rate_limits", summary: "Per-session stanza rate limit (token bucket).",
        options: [
            ModuleOptionSpec("rate", .number(0.1...100_000), default: .number(10), doc: "Stanzas per second a session may send on average."),
            ModuleOptionSpec("burst", .integer(1...100_000), default: .integer(30), doc: "Stanzas a session may send at once."),
            ModuleOptionSpec("connection_rate", .number(0.01...100_000), default: .number(5), doc: "New connections per second one address may open on average."),
            ModuleOptionSpec("connection_burst", .integer(1...100_000), default: .integer(20), doc: "New connections one address may open at once."),
            ModuleOptionSpec("login_failures", .integer(1...100_000), default: .integer(5), doc: "Failed logins per account within the window before further attempts are refused."),
            ModuleOptionSpec("login_failure_window", .number(1...86_400), default: .number(300), doc: "Seconds over which an account's failed logins count."),
        ]
    )

    private struct Bucket: Sendable {
        var tokens: Double
        var updated: Double
    }

    private struct Failures: Sendable {
        var count: Int
        var windowStart: Double
    }

    private let rate: Double
    private let burst: Double
    private let connectionRate: Double
    private let connectionBurst: Double
    private let loginFailures: Int
    private let loginFailureWindow: Double
    private let buckets = ShardedDictionary<JID, Bucket>()
    private let connections = ShardedDictionary<String, Bucket>()
    private let failures = ShardedDictionary<String, Failures>()

    public init(host: any ModuleHost) {
        rate = host.options.number("rate")
        burst = Double(host.options.integer("burst"))
        connectionRate = host.options.number("connection_rate")
        connectionBurst = Double(host.options.integer("connection_burst"))
        loginFailures = host.options.integer("login_failures")
        loginFailureWindow = host.options.number("login_failure_window")
    }

    /// Takes a token from `bucket` (created full); false when it is empty.
    private static func take(_ bucket: inout Bucket?, rate: Double, burst: Double, now: Double) -> Bool {
        var current = bucket ?? Bucket(tokens: burst, updated: now)
        current.tokens = min(burst, current.tokens + (now - current.updated) * rate)
        current.updated = now
        let allowed = current.tokens >= 1
        if allowed { current.tokens -= 1 }
        bucket = current
        return allowed
    }

    private static var now: Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    public func register(_ registrar: ModuleRegistrar) {
        // Early, so a flooding session costs the other hooks nothing.
        registrar.hook(.stanzaFromClient, priority: 2000) { [self] event in
            guard let session = event.origin else { return .pass }
            let now = Self.now
            let allowed = buckets.withValue(for: session) { Self.take(&$0, rate: rate, burst: burst, now: now) }
            return allowed ? .pass : .reject(.policyViolation, text: "stanza rate limit exceeded")
        }
        registrar.hook(.connectionOpened) { [self] event in
            let allowed = connections.withValue(for: event.address) { Self.take(&$0, rate: connectionRate, burst: connectionBurst, now: Self.now) }
            return allowed ? .pass : .reject(.policyViolation, text: "too many connections from your address")
        }
        registrar.hook(.loginAttempt) { [self] event in
            let now = Self.now
            let blocked = failures.withValue(for: "\(event.username)@\(event.host)") { entry -> Bool in
                guard let current = entry else { return false }
                if now - current.windowStart >= loginFailureWindow {
                    entry = nil
                    return false
                }
                return current.count >= loginFailures
            }
            return blocked ? .reject(.policyViolation, text: "too many failed logins for this account") : .pass
        }
        registrar.hook(.loginFailed) { [self] event in
            let now = Self.now
            failures.withValue(for: "\(event.username)@\(event.host)") { entry in
                if let current = entry, now - current.windowStart < loginFailureWindow {
                    entry = Failures(count: current.count + 1, windowStart: current.windowStart)
                } else {
                    entry = Failures(count: 1, windowStart: now)
                }
            }
            return .pass
        }
        registrar.hook(.sessionClosed) { [self] event in
            buckets.removeValue(forKey: event.jid)
            return .pass
        }
    }

    public func saveState() -> [String: String] {
        buckets.snapshot().reduce(into: [:]) { state, entry in state[entry.key.description] = "\(entry.value.tokens) \(entry.value.updated)" }
    }

    public func restoreState(_ state: [String: String]) {
        for (key, value) in state {
            let parts = value.split(separator: " ")
            guard let jid = JID(key), parts.count == 2, let tokens = Double(parts[0]), let updated = Double(parts[1]) else { continue }
            buckets[jid] = Bucket(tokens: tokens, updated: updated)
        }
    }
}

@_cdecl("starling_plugin_api_version")
public func starlingPluginAPIVersion() -> Int { StarlingAPIVersion.compiledAPI }

@_cdecl("starling_plugin_module")
public func starlingPluginModule() -> UnsafeMutableRawPointer { StarlingPlugin.export(RateLimitsModule.self) }
