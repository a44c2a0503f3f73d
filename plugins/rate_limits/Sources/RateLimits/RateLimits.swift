import Dispatch
import StarlingAPI

/// Per-session stanza rate limit, a token bucket like ejabberd's shaper: each session may send `burst`
/// stanzas at once and `rate` per second on average; beyond that its stanzas are refused with
/// `<policy-violation/>` until the bucket refills. Buckets survive `starlingctl reload-module`.
public final class RateLimitsModule: ServerModule, StateHandoverModule {
    public static let descriptor = ModuleDescriptor(
        name: "rate_limits", summary: "Per-session stanza rate limit (token bucket).",
        options: [
            ModuleOptionSpec("rate", .number(0.1...100_000), default: .number(10), doc: "Stanzas per second a session may send on average."),
            ModuleOptionSpec("burst", .integer(1...100_000), default: .integer(30), doc: "Stanzas a session may send at once."),
        ]
    )

    private struct Bucket: Sendable {
        var tokens: Double
        var updated: Double
    }

    private let rate: Double
    private let burst: Double
    private let buckets = ShardedDictionary<JID, Bucket>()

    public init(host: any ModuleHost) {
        rate = host.options.number("rate")
        burst = Double(host.options.integer("burst"))
    }

    private static var now: Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    public func register(_ registrar: ModuleRegistrar) {
        // Early, so a flooding session costs the other hooks nothing.
        registrar.hook(.stanzaFromClient, priority: 2000) { [self] event in
            guard let session = event.origin else { return .pass }
            let now = Self.now
            let allowed = buckets.withValue(for: session) { bucket -> Bool in
                var current = bucket ?? Bucket(tokens: burst, updated: now)
                current.tokens = min(burst, current.tokens + (now - current.updated) * rate)
                current.updated = now
                let allowed = current.tokens >= 1
                if allowed { current.tokens -= 1 }
                bucket = current
                return allowed
            }
            return allowed ? .pass : .reject(.policyViolation, text: "stanza rate limit exceeded")
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
