import Foundation
import Metrics
import StarlingAPI
import StarlingStorage
import Synchronization
private import struct Prometheus.PrometheusMetricsFactory
private import class Prometheus.PrometheusCollectorRegistry

/// The server's metrics, through swift-metrics into one Prometheus registry that `/metrics` renders (on
/// the HTTP listeners with `metrics: true`). Each metric object is made once: updating one on the
/// stanza path is an atomic add, no lookup or lock. Without such a listener nothing is bootstrapped and
/// every update is swift-metrics' no-op.
enum ServerMetrics {
    private static let registry = PrometheusCollectorRegistry()

    /// Routes swift-metrics (ours and the libraries') into `registry`; once per process, before any metric
    /// object below is first used.
    static let bootstrapped: Void = {
        var factory = PrometheusMetricsFactory(registry: registry)
        // Hooks and Lua calls take microseconds, storage operations milliseconds: buckets from 1 µs to 10 s.
        factory.defaultDurationHistogramBuckets = [
            .microseconds(1), .microseconds(5), .microseconds(10), .microseconds(25), .microseconds(50), .microseconds(100),
            .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2.5), .milliseconds(5), .milliseconds(10),
            .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5),
            .seconds(10),
        ]
        MetricsSystem.bootstrap(factory)
        enabledFlag.store(true, ordering: .releasing)
        StorageMetrics.enabled = true
        // Every series exists from the start (at 0), so dashboards and alerts see it before its first event.
        _ = (connections, logins, received, delivered, refused, routing, tlsHandshakes, tlsHandshakeDuration)
    }()

    private static let enabledFlag = Atomic<Bool>(false)
    /// Whether metrics are collected (some listener serves them): meters that cost something exist only then.
    static var enabled: Bool { enabledFlag.load(ordering: .acquiring) }

    /// What happened to stanzas that did not reach a session: kept offline, or answered with an error.
    enum RoutingOutcome: String, CaseIterable {
        case offline, bounced
    }

    static let routing = Dictionary(uniqueKeysWithValues: RoutingOutcome.allCases.map {
        ($0, Metrics.Counter(label: "starling_routing_outcomes_total", dimensions: [("outcome", $0.rawValue)]))
    })

    /// TLS handshakes of client connections (STARTTLS and direct TLS) by result: success, failure (an
    /// error during the handshake), abandoned (the connection closed before it finished).
    enum HandshakeResult: String, CaseIterable {
        case success, failure, abandoned
    }

    static let tlsHandshakes = Dictionary(uniqueKeysWithValues: HandshakeResult.allCases.map {
        ($0, Metrics.Counter(label: "starling_tls_handshakes_total", dimensions: [("result", $0.rawValue)]))
    })
    static let tlsHandshakeDuration = Metrics.Timer(label: "starling_tls_handshake_duration_seconds")

    enum Transport: String, CaseIterable {
        case tcp, websocket, bosh
    }

    /// Open client connections by transport.
    static let connections = Dictionary(uniqueKeysWithValues: Transport.allCases.map {
        ($0, Meter(label: "starling_client_connections", dimensions: [("transport", $0.rawValue)]))
    })

    /// Logins by SASL mechanism family (scram, plain) and outcome.
    static func login(mechanism: String, succeeded: Bool) {
        let family = mechanism.hasPrefix("SCRAM") ? "scram" : mechanism == "PLAIN" ? "plain" : mechanism.hasPrefix("HT-") ? "fast" : "other"
        logins[family]?[succeeded]?.increment()
    }
    private static let logins = Dictionary(uniqueKeysWithValues: ["scram", "plain", "fast", "other"].map { family in
        (family, [true: Metrics.Counter(label: "starling_logins_total", dimensions: [("mechanism", family), ("result", "success")]),
                  false: Metrics.Counter(label: "starling_logins_total", dimensions: [("mechanism", family), ("result", "failure")])])
    })

    /// Stanzas clients sent (routed) and stanzas written to clients, by kind.
    static let received = StanzaCounters(label: "starling_stanzas_received_total")
    static let delivered = StanzaCounters(label: "starling_stanzas_delivered_total")

    struct StanzaCounters {
        let message: Metrics.Counter
        let presence: Metrics.Counter
        let iq: Metrics.Counter

        init(label: String) {
            message = Metrics.Counter(label: label, dimensions: [("kind", "message")])
            presence = Metrics.Counter(label: label, dimensions: [("kind", "presence")])
            iq = Metrics.Counter(label: label, dimensions: [("kind", "iq")])
        }

        func count(_ name: String) {
            switch name {
            case "message": message.increment()
            case "presence": presence.increment()
            default: iq.increment()
            }
        }
    }

    /// Why a connection was closed unread.
    enum Refusal: String, CaseIterable {
        /// A connection hook (Lua, a plugin) refused it.
        case policy
        /// `limits.connection_rate`, `max_connections_per_address`, `max_unauthenticated_per_address`.
        case rate, connections, unauthenticated

        init(_ limit: AddressLimits.Refusal) {
            switch limit {
            case .rate: self = .rate
            case .connections: self = .connections
            case .unauthenticated: self = .unauthenticated
            }
        }
    }

    /// Refused connections by reason.
    static let refused = Dictionary(uniqueKeysWithValues: Refusal.allCases.map {
        ($0, Metrics.Counter(label: "starling_connections_refused_total", dimensions: [("reason", $0.rawValue)]))
    })

    // MARK: Read at each scrape

    private static let sessions = Gauge(label: "starling_sessions")
    private static let detachedSessions = Gauge(label: "starling_detached_sessions")
    private static let residentMemory = Gauge(label: "process_resident_memory_bytes")
    private static let openDescriptors = Gauge(label: "process_open_fds")
    private static let cpuSeconds = Gauge(label: "process_cpu_seconds_total")
    private static let startTime = Gauge(label: "process_start_time_seconds")
    private static let startedAt = Date()

    private static let linkUp = Gauge(label: "starling_cluster_links_up")

    /// The text format, with the gauges that are read rather than kept up to date set first.
    static func render(_ server: ServerContext) -> String {
        if let cluster = server.router.cluster {
            let peers = cluster.status()
            linkUp.record(peers.filter { $0.state == "up" }.count)
            for peer in peers {
                Gauge(label: "starling_cluster_link_up", dimensions: [("peer", peer.node)]).record(peer.state == "up" ? 1 : 0)
                Gauge(label: "starling_cluster_link_backlogged", dimensions: [("peer", peer.node)]).record(peer.backlogged ? 1 : 0)
                if let rtt = peer.roundTripMilliseconds {
                    Gauge(label: "starling_cluster_link_round_trip_seconds", dimensions: [("peer", peer.node)]).record(rtt / 1000)
                }
            }
        }
        sessions.record(server.registry.sessionCount)
        detachedSessions.record(server.detached.count)
        if let rss = ProcessMemory.residentBytes() { residentMemory.record(rss) }
        openDescriptors.record((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0)
        if let cpu = processCPUSeconds() { cpuSeconds.record(cpu) }
        startTime.record(startedAt.timeIntervalSince1970)
        for (key, counters) in server.moduleCounters() {
            let parts = key.split(separator: "/", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { continue }
            for (name, value) in counters {
                Gauge(label: "starling_module_value", dimensions: [("host", parts[0]), ("module", parts[1]), ("name", name)]).record(value)
            }
        }
        return registry.emitToString()
    }

    /// User and system CPU time from /proc/self/stat (Linux).
    private static func processCPUSeconds() -> Double? {
        guard let stat = try? String(contentsOfFile: "/proc/self/stat", encoding: .utf8),
              let end = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: end)...].split(separator: " ")
        // After the command: state is field 3; utime and stime are fields 14 and 15.
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}

/// One module's handler of one hook on one host: its calls, and the duration of one call in
/// `sampleEvery` (timing every call would cost a clock read pair and a histogram lock on every stanza).
final class HookMeter: Sendable {
    static let sampleEvery = 16
    private let calls: Metrics.Counter
    private let durations: Metrics.Timer
    private let sequence = Atomic<Int>(0)

    init(host: String, hook: String, module: String) {
        let dimensions = [("host", host), ("hook", hook), ("module", module)]
        calls = Metrics.Counter(label: "starling_hook_calls_total", dimensions: dimensions)
        durations = Metrics.Timer(label: "starling_hook_duration_seconds", dimensions: dimensions)
    }

    @inline(__always)
    func measure(_ body: () -> HookResult) -> HookResult {
        calls.increment()
        guard sequence.wrappingAdd(1, ordering: .relaxed).oldValue % Self.sampleEvery == 0 else { return body() }
        let start = ContinuousClock.now
        let result = body()
        durations.record(duration: ContinuousClock.now - start)
        return result
    }
}

/// What metering costs a hook call, for `starling-bench metrics-cost`: nanoseconds per call of a no-op
/// handler called plainly and through a `HookMeter`, on `threads` threads at once (they share the meter,
/// as event loops do), with metrics bootstrapped into the Prometheus registry.
public enum HookMeteringCost {
    public static func nanosecondsPerCall(calls: Int, threads: Int) -> (plain: Double, metered: Double) {
        ServerMetrics.bootstrapped
        let meter = HookMeter(host: "bench.example", hook: "stanza-from-client", module: "bench")
        let handler: @Sendable (Any) -> HookResult = { _ in .pass }
        let event: Any = 0
        func time(_ body: @escaping @Sendable () -> Void) -> Double {
            let start = DispatchTime.now().uptimeNanoseconds
            DispatchQueue.concurrentPerform(iterations: threads) { _ in
                for _ in 0..<calls { body() }
            }
            return Double(DispatchTime.now().uptimeNanoseconds - start) * Double(threads) / Double(calls * threads)
        }
        let plain = time { if case .handled = handler(event) { preconditionFailure() } }
        let metered = time { if case .handled = meter.measure({ handler(event) }) { preconditionFailure() } }
        return (plain, metered)
    }
}
