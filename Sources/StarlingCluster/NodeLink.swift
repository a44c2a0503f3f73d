import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import NIOTLS
import Synchronization

/// One established or establishing connection to another node. Writes from any thread are carried to
/// the link's event loop and flushed once per loop turn, however many frames came in it.
public final class NodeLink: @unchecked Sendable {
    let channel: any Channel
    /// The node that dialled this link (of two links between the same pair, the one the node with the
    /// smaller name dialled stays).
    let dialedBy: String
    /// The address this node dialled (nil for a link the peer dialled).
    let dialedAddress: String?
    /// Nanoseconds of uptime when the peer was last heard from.
    let lastHeard = Atomic<UInt64>(NIODeadline.now().uptimeNanoseconds)
    /// Last measured round trip, in microseconds (0 until the first pong).
    let roundTrip = Atomic<UInt64>(0)
    /// Touched on the link's event loop only.
    private var flushScheduled = false
    private var backloggedSince: NIODeadline?
    private let giveUpAfter: TimeAmount

    /// Unflushed bytes above which the link counts as backlogged.
    static let highWaterMark = 16 << 20

    /// Frames and bytes each way, by peer (`starling_cluster_link_*_total`; no-ops without metrics).
    private let framesSent: Metrics.Counter
    private let bytesSent: Metrics.Counter
    let framesReceived: Metrics.Counter

    init(channel: any Channel, dialedBy: String, dialedAddress: String?, giveUpAfter: TimeAmount, peer: String) {
        self.channel = channel
        self.dialedBy = dialedBy
        self.dialedAddress = dialedAddress
        self.giveUpAfter = giveUpAfter
        framesSent = Metrics.Counter(label: "starling_cluster_link_frames_sent_total", dimensions: [("peer", peer)])
        bytesSent = Metrics.Counter(label: "starling_cluster_link_bytes_sent_total", dimensions: [("peer", peer)])
        framesReceived = Metrics.Counter(label: "starling_cluster_link_frames_received_total", dimensions: [("peer", peer)])
    }

    /// Encodes and sends `frame`; false when the link is closed.
    @discardableResult
    func send(_ frame: ClusterFrame) -> Bool {
        guard channel.isActive else { return false }
        var buffer = channel.allocator.buffer(capacity: 256)
        frame.encode(into: &buffer)
        if channel.eventLoop.inEventLoop {
            write(buffer)
        } else {
            channel.eventLoop.execute { self.write(buffer) }
        }
        return true
    }

    private func write(_ buffer: ByteBuffer) {
        // A peer that cannot keep up (its link stays over the high water mark) for as long as a dead node
        // may stay silent counts as unreachable: the link closes rather than queueing without bound, and
        // what is meant for its sessions from then on goes to offline storage until it is back (frames
        // already queued go with the link: links have no acknowledgements).
        if !channel.isWritable {
            let now = NIODeadline.now()
            if let since = backloggedSince {
                if now - since > giveUpAfter {
                    channel.close(promise: nil)
                    return
                }
            } else {
                backloggedSince = now
            }
        } else {
            backloggedSince = nil
        }
        framesSent.increment()
        bytesSent.increment(by: buffer.readableBytes)
        channel.write(buffer, promise: nil)
        guard !flushScheduled else { return }
        flushScheduled = true
        channel.eventLoop.execute {
            self.flushScheduled = false
            self.channel.flush()
        }
    }

    func close() { channel.close(promise: nil) }

    /// Sends `goodbye` after everything queued before it, then closes. The future completes once the
    /// link is closed, or after `limit` for a peer that does not read: a node that exits before its
    /// goodbye reached the kernel leaves its peers waiting `deadAfter` for nothing.
    func leave(within limit: TimeAmount) -> EventLoopFuture<Void> {
        var buffer = channel.allocator.buffer(capacity: 8)
        ClusterFrame.goodbye.encode(into: &buffer)
        let loop = channel.eventLoop
        let left = loop.makePromise(of: Void.self)
        loop.execute {
            // Whichever comes first completes `left`; a promise ignores the later one.
            let giveUp = loop.scheduleTask(in: limit) { left.succeed() }
            self.channel.closeFuture.whenComplete { _ in
                giveUp.cancel()
                left.succeed()
            }
            self.channel.writeAndFlush(buffer).whenComplete { _ in self.channel.close(promise: nil) }
        }
        return left.futureResult
    }
}

/// Carries out the handshake, then hands frames to the cluster node.
final class NodeLinkHandler: ChannelInboundHandler {
    typealias InboundIn = ClusterFrame
    typealias OutboundOut = ByteBuffer

    private let node: ClusterNode
    private let dialer: Bool
    private let dialedAddress: String?
    private var handshake: LinkHandshake?
    private var link: NodeLink?
    private var peer: String?
    /// A peer's snapshot while it arrives.
    private var snapshot: [ClusterSession]?
    private var snapshotClaims: [(domain: String, claimedAt: UInt64)] = []
    /// The digest of the certificate the dialling side was shown (set by TLS verification).
    private let peerCertificateDigest: NIOLockedValueBox<[UInt8]?>?

    init(node: ClusterNode, dialedAddress: String?, peerCertificateDigest: NIOLockedValueBox<[UInt8]?>?) {
        self.node = node
        self.dialer = dialedAddress != nil
        self.dialedAddress = dialedAddress
        self.peerCertificateDigest = peerCertificateDigest
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            let digest = dialer ? (peerCertificateDigest?.withLockedValue { $0 } ?? []) : node.ownCertificateDigest
            let machine = node.makeHandshake(certificateDigest: digest)
            let hello = machine.hello
            handshake = machine
            var buffer = context.channel.allocator.buffer(capacity: 128)
            hello.encode(into: &buffer)
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if let link {
            link.lastHeard.store(NIODeadline.now().uptimeNanoseconds, ordering: .relaxed)
            link.framesReceived.increment()
            handleEstablished(frame, link: link, context: context)
            return
        }
        guard var machine = handshake else {
            fail(context, "frame before TLS was up")
            return
        }
        let action = machine.received(frame)
        handshake = machine
        switch action {
        case .send(let reply):
            var buffer = context.channel.allocator.buffer(capacity: 64)
            reply.encode(into: &buffer)
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        case .established(let peer):
            let link = NodeLink(channel: context.channel, dialedBy: dialer ? node.name : peer, dialedAddress: dialedAddress,
                                giveUpAfter: .milliseconds(Int64(node.settings.deadAfter * 1000)), peer: peer)
            guard node.established(link, peer: peer) else {
                context.close(promise: nil)
                return
            }
            self.link = link
            self.peer = peer
        case .fail(let reason):
            fail(context, reason)
        }
    }

    private func handleEstablished(_ frame: ClusterFrame, link: NodeLink, context: ChannelHandlerContext) {
        guard let peer else { return }
        switch frame {
        case .ping(let value):
            link.send(.pong(value))
        case .pong(let sent):
            let now = NIODeadline.now().uptimeNanoseconds
            if now > sent { link.roundTrip.store((now - sent) / 1000, ordering: .relaxed) }
        case .snapshotBegin:
            snapshot = []
            snapshotClaims = []
        case .sessions(let sessions):
            snapshot?.append(contentsOf: sessions)
        case .claim(let domain, let claimedAt) where snapshot != nil:
            snapshotClaims.append((domain, claimedAt))
        case .snapshotEnd:
            node.delegate?.snapshot(snapshot ?? [], claims: snapshotClaims, from: peer)
            snapshot = nil
            snapshotClaims = []
        case .session, .unbound, .deliver, .claim, .component, .module, .closeSession, .resumeRequest, .resumeState:
            node.delegate?.received(frame, from: peer)
        case .goodbye:
            node.left(peer)
        case .hello, .proof:
            fail(context, "handshake frame on an established link from \(peer)")
        }
    }

    private func fail(_ context: ChannelHandlerContext, _ reason: String) {
        node.logger.error("node link refused", metadata: ["peer": "\(peer ?? context.remoteAddress?.description ?? "?")", "reason": "\(reason)"])
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let link, let peer { node.closed(link, peer: peer) }
        link = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        node.logger.warning("node link error", metadata: ["peer": "\(peer ?? "?")", "error": "\(error)"])
        context.close(promise: nil)
    }
}
