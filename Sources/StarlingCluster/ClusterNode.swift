import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import StarlingAPI
import StarlingStorage
import Synchronization

/// What a cluster node needs from the server it runs in.
public protocol ClusterDelegate: AnyObject, Sendable {
    /// This node's sessions, for a peer that just linked.
    func localSessions() -> [ClusterSession]
    /// The component domains this node serves, for a peer that just linked.
    func localClaims() -> [(domain: String, claimedAt: UInt64)]
    /// A `session`, `unbound`, `deliver`, `claim` or `component` frame from an established peer (on its
    /// link's event loop).
    func received(_ frame: ClusterFrame, from node: String)
    /// A peer's whole table and claims, after it (re)linked: they replace what this node held for it.
    func snapshot(_ sessions: [ClusterSession], claims: [(domain: String, claimedAt: UInt64)], from node: String)
    /// A peer stayed unreachable past `deadAfter`: its sessions are gone.
    func lost(_ node: String)
}

/// How one peer looks from here, for `starlingctl cluster-status`.
public struct ClusterPeerStatus: Sendable, Codable, Equatable {
    public var node: String
    public var link: String?
    /// up, down (reconnecting within the grace period) or lost.
    public var state: String
    public var roundTripMilliseconds: Double?
    /// Seconds since its last database heartbeat, when the registry lists it.
    public var heartbeatAge: Double?
    /// The link holds more unsent bytes than its high water mark (the peer is not keeping up).
    public var backlogged = false
}

/// This node's membership in a cluster: the link listener, links to every other node (dialled by the
/// node with the smaller name, or to every static peer), pings, database registration and heartbeat,
/// and the rule for the dead — a node unreachable for `deadAfter` is lost, its sessions dropped.
public final class ClusterNode: @unchecked Sendable {
    public struct Settings: Sendable {
        public var cluster: String
        public var node: String
        public var linkHost: String
        public var linkPort: Int
        public var secret: [UInt8]
        public var discoverThroughDatabase: Bool
        public var peers: [String]
        public var heartbeat: Double
        public var deadAfter: Double

        public init(cluster: String, node: String, linkHost: String, linkPort: Int, secret: [UInt8], discoverThroughDatabase: Bool,
                    peers: [String], heartbeat: Double, deadAfter: Double) {
            self.cluster = cluster
            self.node = node
            self.linkHost = linkHost
            self.linkPort = linkPort
            self.secret = secret
            self.discoverThroughDatabase = discoverThroughDatabase
            self.peers = peers
            self.heartbeat = heartbeat
            self.deadAfter = deadAfter
        }
    }

    private struct Peer {
        var link: NodeLink?
        var address: String?
        /// When the link went down or fell silent; nil while up.
        var downSince: NIODeadline?
        var lost = false
    }

    private struct Dial {
        var next = NIODeadline.uptimeNanoseconds(0)
        var backoff = TimeAmount.milliseconds(200)
        var inFlight = false
    }

    private struct State {
        var peers: [String: Peer] = [:]
        var dials: [String: Dial] = [:]
        /// Link address → the node found there.
        var nodeAt: [String: String] = [:]
        var members: [ClusterMember] = []
        var listener: (any Channel)?
        var advertised: String = ""
        var stopped = false
        /// Peers added at run time (`join-cluster`).
        var extraPeers: [String] = []
    }

    let settings: Settings
    public var name: String { settings.node }
    let logger: Logger
    let ownCertificateDigest: [UInt8]
    private let serverTLS: NIOSSLContext
    private let clientTLS: NIOSSLContext
    private let digestOfPeerCertificate: @Sendable ([UInt8]) -> [UInt8]
    private let membership: (any ClusterMembershipStore)?
    private let group: any EventLoopGroup
    private let state = NIOLockedValueBox(State())
    /// Established links by node, read on the stanza path (a shard lock, no global one).
    private let liveLinks = ShardedDictionary<String, NodeLink>()
    private let ticker = NIOLockedValueBox<Task<Void, Never>?>(nil)
    private let startedAt = Int64(Date().timeIntervalSince1970)
    /// Set once by `start`, before any link exists.
    public private(set) var delegate: (any ClusterDelegate)?

    /// - Parameters:
    ///   - ownCertificateDigest: the digest (`digestOfPeerCertificate`) of this node's own TLS certificate.
    ///   - digestOfPeerCertificate: digests a DER certificate the same way for both ends of a link.
    public init(settings: Settings, group: any EventLoopGroup, serverTLS: NIOSSLContext, ownCertificateDigest: [UInt8],
                digestOfPeerCertificate: @escaping @Sendable ([UInt8]) -> [UInt8], membership: (any ClusterMembershipStore)?, logger: Logger) throws {
        self.settings = settings
        self.group = group
        self.serverTLS = serverTLS
        self.ownCertificateDigest = ownCertificateDigest
        self.digestOfPeerCertificate = digestOfPeerCertificate
        self.membership = membership
        var logger = logger
        logger[metadataKey: "node"] = "\(settings.node)"
        self.logger = logger
        var client = TLSConfiguration.makeClientConfiguration()
        client.minimumTLSVersion = .tlsv12
        // The peer's certificate is checked by the handshake's proof (it covers the certificate's digest
        // and the shared secret), not by a CA: nodes usually run with the service's certificate, whose
        // names are the XMPP domains rather than the nodes' addresses.
        client.certificateVerification = .noHostnameVerification
        clientTLS = try NIOSSLContext(configuration: client)
    }

    func makeHandshake(certificateDigest: [UInt8]) -> LinkHandshake {
        LinkHandshake(cluster: settings.cluster, node: settings.node, secret: settings.secret, certificateDigest: certificateDigest)
    }

    // MARK: Lifecycle

    /// Listens for links, registers in the database and starts linking; waits (at most `deadAfter`) until
    /// the nodes the registry and the static peers name are linked, so the first clients see the cluster.
    public func start(delegate: any ClusterDelegate) async throws {
        self.delegate = delegate
        let listener = try await ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: NodeLink.highWaterMark / 4, high: NodeLink.highWaterMark))
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(NIOSSLServerHandler(context: serverTLS))
                    try sync.addHandler(ByteToMessageHandler(ClusterFrameDecoder()))
                    try sync.addHandler(NodeLinkHandler(node: self, dialedAddress: nil, peerCertificateDigest: nil))
                }
            }
            .bind(host: settings.linkHost, port: settings.linkPort).get()
        let port = listener.localAddress?.port ?? settings.linkPort
        let advertised = "\(settings.linkHost):\(port)"
        state.withLockedValue {
            $0.listener = listener
            $0.advertised = advertised
        }
        logger.notice("cluster link listening", metadata: ["cluster": "\(settings.cluster)", "link": "\(advertised)"])
        await tick()
        let task = Task { [self] in
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(Int(settings.heartbeat * 1000)))
                if Task.isCancelled { break }
                await tick()
            }
        }
        ticker.withLockedValue { $0 = task }
        let deadline = ContinuousClock.now + .milliseconds(Int(settings.deadAfter * 1000))
        while ContinuousClock.now < deadline && !expectedPeersLinked() {
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    public var linkAddress: String { state.withLockedValue { $0.advertised } }

    private func expectedPeersLinked() -> Bool {
        state.withLockedValue { state in
            let liveMembers = state.members.filter { $0.node != settings.node && $0.silence < settings.deadAfter }.map(\.node)
            let staticNodes = (settings.peers + state.extraPeers).map { state.nodeAt[$0] }
            return liveMembers.allSatisfy { state.peers[$0]?.link != nil } && staticNodes.allSatisfy { $0.map { state.peers[$0]?.link != nil } ?? false }
        }
    }

    /// Leaves the cluster: deregisters, says goodbye on every link and closes it (the others drop this
    /// node's sessions at once rather than after `deadAfter`). Returns once the goodbyes are out, so the
    /// process may exit then.
    public func stop() async {
        state.withLockedValue { $0.stopped = true }
        if let ticker = ticker.withLockedValue({ $0 }) {
            ticker.cancel()
            // A heartbeat already past its `stopped` check would register this node again after it
            // deregistered, or dial a peer whose link just closed (the peer would then see a link that
            // the stopping node drops: down instead of gone). It finishes first, unless the database hangs it.
            let finished = group.next().makePromise(of: Void.self)
            Task {
                await ticker.value
                finished.succeed()
            }
            let giveUp = finished.futureResult.eventLoop.scheduleTask(in: .milliseconds(Int64(settings.deadAfter * 1000))) { finished.succeed() }
            try? await finished.futureResult.get()
            giveUp.cancel()
        }
        let (listener, links) = state.withLockedValue { state -> ((any Channel)?, [NodeLink]) in
            (state.listener, state.peers.values.compactMap(\.link))
        }
        if settings.discoverThroughDatabase, let membership {
            try? await membership.deregisterNode(cluster: settings.cluster, node: settings.node)
        }
        try? await listener?.close()
        let goodbyes = links.map { $0.leave(within: .seconds(2)) }
        for goodbye in goodbyes { try? await goodbye.get() }
    }

    // MARK: Sending

    /// Sends to `node` if its link is up; false otherwise (the caller does what it would for a session
    /// that is gone: offline storage, an error).
    @discardableResult
    public func send(_ frame: ClusterFrame, to node: String) -> Bool {
        liveLinks[node]?.send(frame) ?? false
    }

    /// Sends to every linked node.
    public func broadcast(_ frame: ClusterFrame) {
        for link in state.withLockedValue({ $0.peers.values.compactMap(\.link) }) { link.send(frame) }
    }

    public func status() -> [ClusterPeerStatus] {
        state.withLockedValue { state in
            var names = Set(state.peers.keys)
            names.formUnion(state.members.map(\.node).filter { $0 != settings.node })
            return names.sorted().map { name in
                let peer = state.peers[name]
                let member = state.members.first { $0.node == name }
                let rtt = peer?.link.map { Double($0.roundTrip.load(ordering: .relaxed)) / 1000 }
                let linkState = peer?.link != nil ? "up" : peer?.lost == true ? "lost" : "down"
                return ClusterPeerStatus(node: name, link: peer?.address ?? member?.link, state: linkState,
                                         roundTripMilliseconds: rtt, heartbeatAge: member?.silence,
                                         backlogged: peer?.link.map { !$0.channel.isWritable } ?? false)
            }
        }
    }

    // MARK: Links

    /// A link finished its handshake. Returns false when it is a duplicate to drop.
    func established(_ link: NodeLink, peer: String) -> Bool {
        let keep: Bool = state.withLockedValue { state in
            guard !state.stopped else { return false }
            var entry = state.peers[peer] ?? Peer()
            if let existing = entry.link, existing !== link {
                let preferred = min(settings.node, peer)
                if existing.dialedBy == preferred { return false }
                existing.close()
            }
            entry.link = link
            entry.downSince = nil
            entry.lost = false
            if let address = link.dialedAddress {
                state.nodeAt[address] = peer
                entry.address = address
            }
            state.peers[peer] = entry
            return true
        }
        guard keep else { return false }
        liveLinks[peer] = link
        logger.notice("node linked", metadata: ["peer": "\(peer)"])
        // The whole local table, in chunks, then updates as they happen.
        link.send(.snapshotBegin)
        let sessions = delegate?.localSessions() ?? []
        var start = 0
        while start < sessions.count {
            let end = min(start + 500, sessions.count)
            link.send(.sessions(Array(sessions[start..<end])))
            start = end
        }
        for claim in delegate?.localClaims() ?? [] { link.send(.claim(claim.domain, claimedAt: claim.claimedAt)) }
        link.send(.snapshotEnd)
        return true
    }

    /// Dials `address` from now on, as if it were in `peers` (`starlingctl join-cluster`).
    public func addPeer(_ address: String) {
        state.withLockedValue { state in
            if !state.extraPeers.contains(address) { state.extraPeers.append(address) }
        }
    }

    /// A peer said goodbye: it is gone now, not after `deadAfter`.
    func left(_ peer: String) {
        let first: Bool = state.withLockedValue { state in
            guard var entry = state.peers[peer], !entry.lost else { return false }
            entry.lost = true
            entry.downSince = .now()
            state.peers[peer] = entry
            return true
        }
        guard first else { return }
        liveLinks[peer] = nil
        logger.notice("node left the cluster", metadata: ["peer": "\(peer)"])
        delegate?.lost(peer)
    }

    func closed(_ link: NodeLink, peer: String) {
        let wasCurrent: Bool = state.withLockedValue { state in
            guard var entry = state.peers[peer], entry.link === link else { return false }
            entry.link = nil
            // A link cut for silence went quiet when the peer was last heard from.
            let heard = NIODeadline.uptimeNanoseconds(link.lastHeard.load(ordering: .relaxed))
            entry.downSince = min(NIODeadline.now(), heard)
            state.peers[peer] = entry
            return true
        }
        guard wasCurrent else { return }
        if liveLinks[peer] === link { liveLinks[peer] = nil }
        logger.warning("node link down", metadata: ["peer": "\(peer)"])
    }

    /// Once per heartbeat: registry heartbeat and discovery, pings, silence and death checks, dials.
    private func tick() async {
        if state.withLockedValue({ $0.stopped }) { return }
        var members: [ClusterMember]?
        if settings.discoverThroughDatabase, let membership {
            do {
                try await membership.registerNode(cluster: settings.cluster, node: settings.node, link: linkAddress, startedAt: startedAt)
                members = try await membership.clusterMembers(cluster: settings.cluster)
            } catch {
                logger.warning("cluster registry unreachable; links carry on", metadata: ["error": "\(error)"])
            }
        }
        let now = NIODeadline.now()
        let deadAfter = TimeAmount.milliseconds(Int64(settings.deadAfter * 1000))
        var toPing: [NodeLink] = []
        var silent: [NodeLink] = []
        var lost: [String] = []
        var toDial: [String] = []
        state.withLockedValue { state in
            guard !state.stopped else { return }
            if let members { state.members = members }
            for (name, var peer) in state.peers {
                if let link = peer.link {
                    let heard = NIODeadline.uptimeNanoseconds(link.lastHeard.load(ordering: .relaxed))
                    if now - heard > deadAfter { silent.append(link) } else { toPing.append(link) }
                } else if let since = peer.downSince, now - since > deadAfter, !peer.lost {
                    peer.lost = true
                    state.peers[name] = peer
                    lost.append(name)
                }
            }
            // Addresses to dial: registered nodes this node dials (it has the smaller name), and static peers.
            var addresses: [String] = []
            for member in state.members where member.node > settings.node && member.silence < max(60, settings.deadAfter * 4) {
                if state.peers[member.node]?.link == nil {
                    addresses.append(member.link)
                    state.peers[member.node, default: Peer()].address = member.link
                }
            }
            for peer in settings.peers + state.extraPeers where peer != state.advertised {
                if let known = state.nodeAt[peer], state.peers[known]?.link != nil { continue }
                addresses.append(peer)
            }
            for address in Set(addresses) {
                var dial = state.dials[address] ?? Dial()
                guard !dial.inFlight, dial.next <= now else { continue }
                dial.inFlight = true
                state.dials[address] = dial
                toDial.append(address)
            }
        }
        for link in silent {
            logger.warning("node link silent; closing it", metadata: ["peer": "\(link.channel.remoteAddress?.description ?? "?")"])
            link.close()
        }
        let stamp = now.uptimeNanoseconds
        for link in toPing { link.send(.ping(stamp)) }
        for node in lost {
            logger.error("node lost: its sessions are dropped", metadata: ["peer": "\(node)", "after_seconds": "\(settings.deadAfter)"])
            liveLinks[node] = nil
            delegate?.lost(node)
        }
        for address in toDial { dial(address) }
    }

    private func dial(_ address: String) {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else { return }
        let host = String(address[..<colon])
        logger.debug("dialling a node", metadata: ["link": "\(address)"])
        let digest = NIOLockedValueBox<[UInt8]?>(nil)
        let digestOf = digestOfPeerCertificate
        let bootstrap = ClientBootstrap(group: group)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: NodeLink.highWaterMark / 4, high: NodeLink.highWaterMark))
            .connectTimeout(.milliseconds(Int64(max(500, settings.deadAfter * 500))))
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    let tls = try NIOSSLClientHandler(context: clientTLS, serverHostname: nil) { certificates, promise in
                        if let leaf = certificates.first, let der = try? leaf.toDERBytes() { digest.withLockedValue { $0 = digestOf(der) } }
                        promise.succeed(.certificateVerified)
                    }
                    try sync.addHandler(tls)
                    try sync.addHandler(ByteToMessageHandler(ClusterFrameDecoder()))
                    try sync.addHandler(NodeLinkHandler(node: self, dialedAddress: address, peerCertificateDigest: digest))
                }
            }
        bootstrap.connect(host: host, port: port).whenComplete { [self] result in
            state.withLockedValue { state in
                var dial = state.dials[address] ?? Dial()
                dial.inFlight = false
                switch result {
                case .success:
                    dial.backoff = .milliseconds(200)
                    dial.next = .now() + .milliseconds(Int64(settings.heartbeat * 1000))
                case .failure:
                    dial.next = .now() + dial.backoff
                    dial.backoff = min(dial.backoff * 2, .seconds(5))
                }
                state.dials[address] = dial
            }
            if case .failure(let error) = result {
                logger.debug("cannot reach a node", metadata: ["link": "\(address)", "error": "\(error)"])
            }
        }
    }
}
