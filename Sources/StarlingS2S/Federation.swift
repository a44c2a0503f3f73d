import Foundation
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import StarlingAPI
import Synchronization
import StarlingXML

/// What the server supplies to federation: where stanzas from other domains go, what happens to those
/// that could not be sent, and the policy on which domains we talk to.
public protocol FederationDelegate: AnyObject, Sendable {
    /// A stanza from an authenticated remote domain to one of ours, in `jabber:client` like every stanza inside.
    func stanzaFromRemote(_ stanza: XMLElement)
    /// A stanza that could not reach its remote domain: its sender gets `failure.condition`.
    func undeliverable(_ stanza: XMLElement, _ failure: S2SFailure)
    /// Whether a stream with `domain` may open (block list, policy hooks).
    func allowsStream(with domain: String, incoming: Bool, address: String?) -> Bool
}

/// Where a remote domain's server listens.
public struct S2SEndpoint: Sendable, Equatable, CustomStringConvertible {
    public let host: String
    public let port: Int
    /// XEP-0368: TLS from the first byte.
    public let directTLS: Bool
    public init(host: String, port: Int, directTLS: Bool = false) {
        self.host = host
        self.port = port
        self.directTLS = directTLS
    }
    public var description: String { "\(host):\(port)\(directTLS ? " (direct TLS)" : "")" }
}

/// Federation's settings, from the `s2s:` section.
public struct FederationSettings: Sendable {
    public var stream: S2SStreamSettings
    public var keys: DialbackKeys
    /// Remote domains reached at fixed addresses instead of through DNS.
    public var routes: [String: [S2SEndpoint]] = [:]
    /// A name server (IPv4 address and port) to ask instead of the system's.
    public var nameServer: (host: String, port: Int)?
    /// Certificate authorities for SASL EXTERNAL; nil: every peer uses dialback.
    public var trustRoots: TrustRoots?
    public var blockedDomains: Set<String> = []
    /// Stanzas that may wait for one remote domain's stream to come up.
    public var queueLimit = 1000
    public var connectTimeout = 10.0
    /// Seconds a stream may take from connect to authenticated.
    public var negotiationTimeout = 30.0
    public var idleTimeout = 600.0
    public var keepaliveInterval = 90.0
    /// Incoming streams one remote domain may hold open at once.
    public var maxIncomingPerDomain = 8
    public var maxStanzaBytes = 262_144
    public var maxDepth = 32

    public init(stream: S2SStreamSettings, keys: DialbackKeys) {
        self.stream = stream
        self.keys = keys
    }
}

/// One s2s stream, for `starlingctl s2s-connections` and the admin API.
public struct S2SConnectionInfo: Sendable, Equatable {
    public enum Direction: String, Sendable { case incoming, outgoing }
    public let direction: Direction
    public let remote: String
    public let pairs: [DomainPair]
    public let address: String
    public let tls: Bool
    public let ready: Bool
    /// How the peer (incoming) or we (outgoing) authenticated: "SASL EXTERNAL" or "dialback".
    public let method: String?
    /// The peer's certificate chains to the CA bundle and names its domain.
    public let certificateVerified: Bool
    /// XEP-0288: the stream carries stanzas both ways.
    public let bidirectional: Bool
    public let stanzasIn: Int
    public let stanzasOut: Int
}

/// Server-to-server federation: the outgoing stream per domain pair (opened on demand, stanzas queued
/// while it comes up and bounced if it cannot), incoming streams from other servers, and dialback
/// verification in both roles.
public final class Federation: @unchecked Sendable {
    let settings: FederationSettings
    let logger: Logger
    private let group: any EventLoopGroup
    let serverTLS: NIOSSLContext
    let clientTLS: NIOSSLContext
    private let resolver: S2SResolver
    /// Set once by `start`, before any stream opens; held for the server's lifetime.
    private var delegate: (any FederationDelegate)?
    /// The outgoing stream of each domain pair; a lookup per stanza to another domain, nothing more.
    private let routes = NIOLockedValueBox<[DomainPair: OutgoingRoute]>([:])
    private let open = NIOLockedValueBox<[ObjectIdentifier: S2SHandler]>([:])
    private let verifications = NIOLockedValueBox<[ObjectIdentifier: EventLoopPromise<DialbackOutcome>]>([:])
    /// Authenticated incoming streams per remote domain (`max_incoming_per_domain`).
    private let incomingPerDomain = NIOLockedValueBox<[String: Int]>([:])
    private let streamsGauge = (incoming: Meter(label: "starling_s2s_streams", dimensions: [("direction", "incoming")]),
                                outgoing: Meter(label: "starling_s2s_streams", dimensions: [("direction", "outgoing")]))
    /// Read on every stanza to another domain: an atomic, not a lock.
    private let stopping = Atomic<Bool>(false)

    /// - Parameters:
    ///   - certificateChain/privateKey: the server's own identity, presented in both directions.
    public init(settings: FederationSettings, certificateChain: [NIOSSLCertificate], privateKey: NIOSSLPrivateKey,
                group: any EventLoopGroup, logger: Logger) throws {
        self.settings = settings
        self.logger = logger
        self.group = group
        var server = TLSConfiguration.makeServerConfiguration(certificateChain: certificateChain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        server.minimumTLSVersion = .tlsv12
        // Ask for the peer's certificate without requiring it; the verification callback keeps it for XEP-0178.
        server.certificateVerification = .optionalVerification
        server.applicationProtocols = ["xmpp-server"]
        var client = TLSConfiguration.makeClientConfiguration()
        client.minimumTLSVersion = .tlsv12
        client.certificateChain = certificateChain.map { .certificate($0) }
        client.privateKey = .privateKey(privateKey)
        client.certificateVerification = .optionalVerification
        client.applicationProtocols = ["xmpp-server"]
        do {
            serverTLS = try NIOSSLContext(configuration: server)
            clientTLS = try NIOSSLContext(configuration: client)
        } catch {
            throw S2SSetupError("cannot set up TLS for s2s: \(error)")
        }
        resolver = S2SResolver(routes: settings.routes, nameServer: settings.nameServer)
    }

    public func start(delegate: any FederationDelegate) {
        self.delegate = delegate
    }

    // MARK: Incoming

    /// Adds the handlers for a connection accepted by an s2s listener.
    public func initializeIncoming(_ channel: any Channel, directTLS: Bool) throws {
        let machine = S2SIncomingMachine(settings: settings.stream, keys: settings.keys, tlsActive: directTLS)
        let handler = S2SHandler(federation: self, role: .incoming(machine), loop: channel.eventLoop)
        let sync = channel.pipeline.syncOperations
        if directTLS { try sync.addHandler(try handler.makeTLSHandler(server: true, loop: channel.eventLoop)) }
        try sync.addHandler(IdleStateHandler(readTimeout: .milliseconds(Int64(settings.idleTimeout * 1000))))
        try sync.addHandler(handler)
    }

    func opened(_ handler: S2SHandler) {
        open.withLockedValue { $0[ObjectIdentifier(handler)] = handler }
        (handler.isIncoming ? streamsGauge.incoming : streamsGauge.outgoing).increment()
    }

    func closed(_ handler: S2SHandler) {
        if open.withLockedValue({ $0.removeValue(forKey: ObjectIdentifier(handler)) }) != nil {
            (handler.isIncoming ? streamsGauge.incoming : streamsGauge.outgoing).decrement()
        }
        if let promise = verifications.withLockedValue({ $0.removeValue(forKey: ObjectIdentifier(handler)) }) {
            promise.succeed(.error(.remoteServerNotFound))
        }
    }

    /// Counts an authenticated incoming stream of `domain`; false when it already has `max_incoming_per_domain`.
    func admitIncoming(from domain: String) -> Bool {
        incomingPerDomain.withLockedValue { counts in
            guard counts[domain, default: 0] < settings.maxIncomingPerDomain else { return false }
            counts[domain, default: 0] += 1
            return true
        }
    }

    func releaseIncoming(from domain: String) {
        incomingPerDomain.withLockedValue { counts in
            counts[domain, default: 1] -= 1
            if counts[domain] == 0 { counts[domain] = nil }
        }
    }

    func received(_ stanza: XMLElement) {
        delegate?.stanzaFromRemote(stanza)
    }

    func allowsStream(with domain: String, incoming: Bool, address: String?) -> Bool {
        let domain = domain.lowercased()
        if settings.blockedDomains.contains(domain) { return false }
        return delegate?.allowsStream(with: domain, incoming: incoming, address: address) ?? true
    }

    /// Every open stream, in both directions.
    public func connections() async -> [S2SConnectionInfo] {
        let handlers = open.withLockedValue { Array($0.values) }
        var result: [S2SConnectionInfo] = []
        for handler in handlers {
            guard let info = try? await handler.loop.submit({ handler.info() }).get() else { continue }
            result.append(info)
        }
        return result.sorted { ($0.remote, $0.direction.rawValue) < ($1.remote, $1.direction.rawValue) }
    }

    // MARK: Outgoing

    /// Sends a stanza from `local` (one of our domains) to `remote`, opening a stream if none is up.
    public func send(_ stanza: XMLElement, from local: String, to remote: String) {
        let pair = DomainPair(local: local, remote: remote.lowercased())
        guard !stopping.load(ordering: .relaxed) else {
            delegate?.undeliverable(stanza, S2SFailure(.remoteServerTimeout, "this server is shutting down"))
            return
        }
        if let route = routes.withLockedValue({ $0[pair] }) {
            route.loop.execute { route.submit(stanza) }
            return
        }
        // Policy (block list, hooks) decides when a stream is to be opened, not on every stanza over it.
        guard allowsStream(with: pair.remote, incoming: false, address: nil) else {
            delegate?.undeliverable(stanza, S2SFailure(.remoteServerNotFound, "this server does not federate with \(pair.remote)"))
            return
        }
        let (route, new) = routes.withLockedValue { routes -> (OutgoingRoute, Bool) in
            if let route = routes[pair] { return (route, false) }
            let route = OutgoingRoute(pair: pair, loop: group.next(), federation: self)
            routes[pair] = route
            return (route, true)
        }
        route.loop.execute {
            route.submit(stanza)
            if new { self.connect(route, purpose: .stanzas) }
        }
    }

    /// An incoming stream that became bidirectional (XEP-0288) for `pair`: our stanzas for `pair.remote`
    /// go out on it, unless a stream of our own already serves the pair (or is coming up). Called on its loop.
    func bidirectional(_ handler: S2SHandler, for pair: DomainPair) -> OutgoingRoute? {
        let route = routes.withLockedValue { routes -> OutgoingRoute? in
            guard routes[pair] == nil else { return nil }
            let route = OutgoingRoute(pair: pair, loop: handler.loop, federation: self)
            routes[pair] = route
            return route
        }
        route?.ready(handler)
        return route
    }

    /// Forgets a route that failed or closed, so the next stanza opens a new one.
    func remove(_ route: OutgoingRoute) {
        routes.withLockedValue { routes in
            if routes[route.pair] === route { routes[route.pair] = nil }
        }
    }

    func bounce(_ stanzas: [XMLElement], _ failure: S2SFailure) {
        guard !stanzas.isEmpty else { return }
        Counter(label: "starling_s2s_bounced_total", dimensions: [("condition", failure.condition.rawValue)]).increment(by: stanzas.count)
        for stanza in stanzas { delegate?.undeliverable(stanza, failure) }
    }

    /// Resolves the remote domain and tries its endpoints in order until one connects.
    private func connect(_ route: OutgoingRoute?, pair: DomainPair? = nil, purpose: S2SPurpose, verification: EventLoopPromise<DialbackOutcome>? = nil) {
        let pair = route?.pair ?? pair!
        let loop = route?.loop ?? verification!.futureResult.eventLoop
        let resolved = loop.makePromise(of: [S2SEndpoint].self)
        resolved.completeWithTask { [resolver] in try await resolver.endpoints(for: pair.remote) }
        resolved.futureResult.whenComplete { result in
            switch result {
            case .success(let endpoints) where !endpoints.isEmpty:
                self.tryEndpoints(endpoints[...], pair: pair, purpose: purpose, route: route, verification: verification, loop: loop, lastError: nil)
            case .success:
                self.connectFailed(route, verification, S2SFailure(.remoteServerNotFound, "\(pair.remote) has no address in DNS"))
            case .failure(let failure as S2SFailure):
                self.connectFailed(route, verification, failure)
            case .failure(let error):
                self.connectFailed(route, verification, S2SFailure(.remoteServerNotFound, "cannot resolve \(pair.remote): \(error)"))
            }
        }
    }

    private func tryEndpoints(_ endpoints: ArraySlice<S2SEndpoint>, pair: DomainPair, purpose: S2SPurpose, route: OutgoingRoute?,
                              verification: EventLoopPromise<DialbackOutcome>?, loop: any EventLoop, lastError: (any Error)?) {
        guard let endpoint = endpoints.first else {
            let timedOut = (lastError as? ChannelError).map { if case .connectTimeout = $0 { return true } else { return false } } ?? false
            connectFailed(route, verification, S2SFailure(timedOut ? .remoteServerTimeout : .remoteServerNotFound,
                                                          "cannot connect to \(pair.remote): \(lastError.map { "\($0)" } ?? "no address")"))
            return
        }
        let machine = S2SOutgoingMachine(pair: pair, purpose: purpose, settings: settings.stream, keys: settings.keys, tlsActive: endpoint.directTLS)
        let handler = S2SHandler(federation: self, role: .outgoing(machine, route), loop: loop)
        if let verification { verifications.withLockedValue { $0[ObjectIdentifier(handler)] = verification } }
        let idle = settings.idleTimeout
        ClientBootstrap(group: loop)
            .connectTimeout(.milliseconds(Int64(settings.connectTimeout * 1000)))
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if endpoint.directTLS { try sync.addHandler(try handler.makeTLSHandler(server: false, loop: channel.eventLoop)) }
                    try sync.addHandler(IdleStateHandler(readTimeout: .milliseconds(Int64(idle * 1000))))
                    try sync.addHandler(handler)
                }
            }
            .connect(host: endpoint.host, port: endpoint.port)
            .whenFailure { error in
                if verification != nil { _ = self.verifications.withLockedValue { $0.removeValue(forKey: ObjectIdentifier(handler)) } }
                self.logger.info("s2s: cannot connect", metadata: ["remote": "\(pair.remote)", "endpoint": "\(endpoint)", "error": "\(error)"])
                self.tryEndpoints(endpoints.dropFirst(), pair: pair, purpose: purpose, route: route, verification: verification, loop: loop, lastError: error)
            }
    }

    private func connectFailed(_ route: OutgoingRoute?, _ verification: EventLoopPromise<DialbackOutcome>?, _ failure: S2SFailure) {
        logger.warning("s2s: no stream to remote domain", metadata: ["reason": "\(failure.reason)"])
        route?.loop.execute { route?.failed(failure) }
        verification?.succeed(.error(failure.condition))
    }

    // MARK: Dialback verification (we are the receiving server)

    /// Asks `request.pair.remote`'s authoritative server whether it gave out `request.key`, over a
    /// stream of its own that closes with the answer.
    func verify(_ request: DialbackRequest) -> EventLoopFuture<DialbackOutcome> {
        let promise = group.next().makePromise(of: DialbackOutcome.self)
        connect(nil, pair: request.pair, purpose: .verify(key: request.key, streamID: request.streamID), verification: promise)
        return promise.futureResult
    }

    func verificationFinished(_ handler: S2SHandler, _ outcome: DialbackOutcome) {
        verifications.withLockedValue { $0.removeValue(forKey: ObjectIdentifier(handler)) }?.succeed(outcome)
    }

    // MARK: Shutdown

    /// Closes every stream with `<system-shutdown/>`; stanzas still waiting are bounced.
    public func shutdown() async {
        stopping.store(true, ordering: .relaxed)
        let handlers = open.withLockedValue { Array($0.values) }
        for handler in handlers {
            handler.loop.execute { handler.closeStream(.systemShutdown, nil) }
        }
        for _ in 0..<50 where !open.withLockedValue({ $0.isEmpty }) { try? await Task.sleep(for: .milliseconds(20)) }
    }
}

/// The outgoing stream of one domain pair and the stanzas waiting for it; used on `loop` only.
final class OutgoingRoute: @unchecked Sendable {
    let pair: DomainPair
    let loop: any EventLoop
    private unowned let federation: Federation
    private var queue: [XMLElement] = []
    private var stream: S2SHandler?
    /// Failed or closed: the federation has forgotten it, and a stanza that still reaches it starts a new one.
    private var finished = false

    init(pair: DomainPair, loop: any EventLoop, federation: Federation) {
        self.pair = pair
        self.loop = loop
        self.federation = federation
    }

    func submit(_ stanza: XMLElement) {
        loop.assertInEventLoop()
        if let stream {
            stream.send(stanza)
            return
        }
        if finished {
            federation.send(stanza, from: pair.local, to: pair.remote)
            return
        }
        guard queue.count < federation.settings.queueLimit else {
            federation.bounce([stanza], S2SFailure(.resourceConstraint, "too many stanzas are waiting for the stream to \(pair.remote)"))
            return
        }
        queue.append(stanza)
    }

    func ready(_ handler: S2SHandler) {
        loop.assertInEventLoop()
        stream = handler
        let waiting = queue
        queue = []
        for stanza in waiting { handler.send(stanza) }
    }

    func failed(_ failure: S2SFailure) {
        loop.assertInEventLoop()
        finished = true
        federation.remove(self)
        let waiting = queue
        queue = []
        federation.bounce(waiting, failure)
    }

    func closed(_ handler: S2SHandler) {
        loop.assertInEventLoop()
        finished = true
        federation.remove(self)
        stream = nil
    }
}
