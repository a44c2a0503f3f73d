import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StarlingAPI
import StarlingFAST
import StarlingCluster
import StarlingConfig
import StarlingModules
import StarlingStorage

/// What every connection shares: configuration, stores, routing and TLS. Immutable or internally
/// synchronized, so handlers on any event loop may use it.
public final class ServerContext: Sendable {
    public let configuration: StarlingConfiguration
    public let accounts: any AccountStore
    /// XEP-0484 FAST tokens; nil when `auth.fast.mechanisms` is empty.
    public let fastTokens: FASTTokens?
    public let registry: SessionRegistry
    public let router: Router
    public let tls: TLSIdentity
    public let failures: AuthFailureTracker
    public let connections: ConnectionSet
    /// What each client address may hold and open (`limits.max_unauthenticated_per_address`, ...).
    public let addressLimits: AddressLimits
    /// Sessions waiting to be resumed (XEP-0198).
    let detached = DetachedSessions()
    /// Resumptions of sessions another node holds, waiting for its answer.
    let remoteResumptions = RemoteResumptions()
    public let threadPool: NIOThreadPool
    public let logger: Logger

    /// - Parameter cluster: this node's cluster membership (not started yet), if clustered.
    public init(configuration: StarlingConfiguration, accounts: any AccountStore, fastTokens: FASTTokens? = nil, tls: TLSIdentity,
                threadPool: NIOThreadPool, logger: Logger, cluster: ClusterNode? = nil) {
        self.configuration = configuration
        self.accounts = accounts
        self.fastTokens = fastTokens
        self.tls = tls
        self.threadPool = threadPool
        self.logger = logger
        registry = SessionRegistry { change in
            switch change {
            case .updated(let session): cluster?.broadcast(.session(session))
            case .unbound(let jid, let boundAt): cluster?.broadcast(.unbound(jid, boundAt: boundAt))
            }
        }
        router = Router(registry: registry, configuration: configuration, logger: logger, cluster: cluster)
        failures = AuthFailureTracker(
            baseDelay: configuration.auth.failureDelay,
            threshold: configuration.auth.failuresBeforeSlowdown,
            window: configuration.auth.failureWindow,
            accountThreshold: configuration.auth.accountFailuresBeforeLockout
        )
        connections = ConnectionSet()
        let limits = configuration.limits
        addressLimits = AddressLimits(maxUnauthenticated: limits.maxUnauthenticatedPerAddress, maxConnections: limits.maxConnectionsPerAddress,
                                      rate: limits.connectionRate, burst: limits.connectionBurst)
    }

    /// Module and config reloads, set by the server once its modules run. Blocking: call them off the
    /// event loops.
    let reloads = NIOLockedValueBox<LiveReloads?>(nil)

    /// Reloads every reloadable module (hook scripts) on every host. Each module swaps in its new
    /// version only if all of it loaded, so a failure leaves that module as it was. Blocking: call it
    /// off the event loops.
    func reloadHooks() -> (summaries: [String], errors: [String]) {
        var summaries: [String] = []
        var errors: [String] = []
        for (_, host) in router.modules.sorted(by: { $0.key < $1.key }) {
            for (_, module) in host.modules.sorted(by: { $0.key < $1.key }) {
                guard let reloadable = module as? any ReloadableModule else { continue }
                do { summaries.append(try reloadable.reload()) } catch { errors.append("\(host.domain): \(error)") }
            }
        }
        return (summaries, errors)
    }

    /// Said after a reload in a cluster: it changed this node only.
    var scopeNote: [String] {
        guard let cluster = configuration.cluster else { return [] }
        return ["(node \(cluster.node) only: run it on every node of the cluster)"]
    }

    /// The counters of every module that keeps them, by "host/module".
    func moduleCounters() -> [String: [String: Int]] {
        var counters: [String: [String: Int]] = [:]
        for (domain, host) in router.modules {
            for (name, module) in host.modules {
                if let reporting = module as? any StatusReportingModule { counters["\(domain)/\(name)"] = reporting.statusCounters }
            }
        }
        return counters
    }

    /// What Bind2 can enable inline on a host: stream management where its module runs, carbons' `<enable/>`
    /// IQ and client state indication where their modules run — what a client would otherwise send right after
    /// binding.
    /// The `<enable/>` IQs whose XEPs define them inline in Bind2 (XEP-0280 carbons). Others, such as
    /// push's, carry parameters that belong in their own request.
    static let bind2Enables: Set<String> = ["urn:xmpp:carbons:2"]

    static func bind2Inline(_ modules: HostModules) -> [String] {
        var namespaces: [String] = []
        if modules.adapters["stream_management"] != nil { namespaces.append(StreamManagement.namespace) }
        let enableIQs = modules.iqHandlers.keys.filter { $0.type == .set && $0.name == "enable" && Self.bind2Enables.contains($0.namespace) }.map(\.namespace)
        namespaces += enableIQs.sorted()
        if modules.adapters["csi"] != nil { namespaces.append(ClientStateModule.namespace) }
        return namespaces
    }

    /// Settings for a listener's streams; call after the modules are installed (they add features).
    func settings(for listener: ListenerConfiguration) -> C2SSettings {
        settings(offeringStartTLS: listener.tls == .starttls)
    }

    /// For WebSocket and BOSH sessions, where TLS (if any) belongs to the HTTP connection.
    func httpSettings() -> C2SSettings {
        settings(offeringStartTLS: false)
    }

    private func settings(offeringStartTLS: Bool) -> C2SSettings {
        var settings = C2SSettings(
            hosts: Set(configuration.hosts),
            defaultHost: configuration.hosts[0],
            mechanisms: configuration.auth.mechanisms,
            tlsRequired: configuration.tls.required,
            offersStartTLS: offeringStartTLS
        )
        settings.plainWithoutTLS = configuration.auth.plainWithoutTLS
        settings.fastMechanisms = fastTokens == nil ? [] : configuration.auth.fast.mechanisms
        settings.moduleAuthenticatedHosts = Set(configuration.hosts.filter { configuration.auth.method(for: $0) != "internal" })
        for (host, modules) in router.modules {
            settings.preAuthFeatures[host] = modules.preAuthStreamFeatures
            settings.boundFeatures[host] = modules.boundStreamFeatures
            settings.bind2Inline[host] = Self.bind2Inline(modules)
        }
        return settings
    }
}

/// Open client connections, so shutdown can say goodbye to each and status can count them.
public final class ConnectionSet: Sendable {
    private let connections = NIOLockedValueBox<[ObjectIdentifier: @Sendable () -> Void]>([:])

    func insert(_ id: ObjectIdentifier, shutdown: @escaping @Sendable () -> Void) {
        connections.withLockedValue { $0[id] = shutdown }
    }

    func remove(_ id: ObjectIdentifier) {
        _ = connections.withLockedValue { $0.removeValue(forKey: id) }
    }

    public var count: Int { connections.withLockedValue { $0.count } }

    /// Asks every connection to close with `<system-shutdown/>`.
    func shutdownAll() {
        for shutdown in connections.withLockedValue({ Array($0.values) }) { shutdown() }
    }
}
