import Foundation
import Metrics
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
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        // Every series exists from the start (at 0), so dashboards and alerts see it before its first event.
        _ = (connections, logins, received, delivered, refused)
    }()

    enum Transport: String, CaseIterable {
        case tcp, websocket, bosh
    }

    /// Open client connections by transport.
    static let connections = Dictionary(uniqueKeysWithValues: Transport.allCases.map {
        ($0, Meter(label: "starling_client_connections", dimensions: [("transport", $0.rawValue)]))
    })

    /// Logins by SASL mechanism family (scram, plain) and outcome.
    static func login(mechanism: String, succeeded: Bool) {
        let family = mechanism.hasPrefix("SCRAM") ? "scram" : mechanism == "PLAIN" ? "plain" : "other"
        logins[family]?[succeeded]?.increment()
    }
    private static let logins = Dictionary(uniqueKeysWithValues: ["scram", "plain", "other"].map { family in
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

    /// The text format, with the gauges that are read rather than kept up to date set first.
    static func render(_ server: ServerContext) -> String {
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
