import Crypto

/// The start of a node link as a state machine: both sides send `hello`, each proves it knows the
/// cluster secret over both nonces, both names and the TLS certificate the link runs over (so a relay
/// with a certificate of its own cannot pass proofs through), and the link is up once the other side's
/// proof checks out. The handler carries out what it returns.
public struct LinkHandshake {
    public enum Action: Equatable {
        case send(ClusterFrame)
        case established(peer: String)
        case fail(String)
    }

    private enum State {
        case awaitingHello
        case awaitingProof(peer: String, peerNonce: [UInt8])
        case established(peer: String)
        case failed
    }

    private var state = State.awaitingHello
    private let cluster: String
    private let node: String
    private let secret: SymmetricKey
    private let nonce: [UInt8]
    /// A digest of the certificate the link's TLS runs over, as both ends see it.
    private let certificateDigest: [UInt8]

    public init(cluster: String, node: String, secret: [UInt8], certificateDigest: [UInt8], nonce: [UInt8] = LinkHandshake.makeNonce()) {
        self.cluster = cluster
        self.node = node
        self.secret = SymmetricKey(data: secret)
        self.certificateDigest = certificateDigest
        self.nonce = nonce
    }

    public static func makeNonce() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    /// The first frame to send.
    public var hello: ClusterFrame { .hello(version: ClusterFrame.wireVersion, cluster: cluster, node: node, nonce: nonce) }

    public var peer: String? {
        if case .established(let peer) = state { return peer }
        return nil
    }

    /// A frame that arrived before the link was up (afterwards the handler handles frames itself).
    public mutating func received(_ frame: ClusterFrame) -> Action {
        switch state {
        case .awaitingHello:
            guard case .hello(let version, let peerCluster, let peer, let peerNonce) = frame else { return fail("expected hello") }
            guard version == ClusterFrame.wireVersion else {
                return fail("peer \(peer) speaks link version \(version), this node \(ClusterFrame.wireVersion): refusing to link mixed versions")
            }
            guard peerCluster == cluster else { return fail("peer \(peer) belongs to cluster '\(peerCluster)', not '\(cluster)'") }
            guard peer != node, !peer.isEmpty else { return fail("peer claims this node's name '\(peer)'") }
            guard peerNonce.count == 32 else { return fail("peer \(peer) sent a bad nonce") }
            state = .awaitingProof(peer: peer, peerNonce: peerNonce)
            return .send(.proof(mac(from: node, to: peer, senderNonce: nonce, receiverNonce: peerNonce)))
        case .awaitingProof(let peer, let peerNonce):
            guard case .proof(let proof) = frame else { return fail("expected proof from \(peer)") }
            let expected = mac(from: peer, to: node, senderNonce: peerNonce, receiverNonce: nonce)
            guard constantTimeEqual(proof, expected) else {
                return fail("peer \(peer) does not know the cluster secret (or the link's TLS was intercepted)")
            }
            state = .established(peer: peer)
            return .established(peer: peer)
        case .established(let peer):
            return fail("unexpected handshake frame from \(peer)")
        case .failed:
            return .fail("link already failed")
        }
    }

    private mutating func fail(_ reason: String) -> Action {
        state = .failed
        return .fail(reason)
    }

    private func mac(from sender: String, to receiver: String, senderNonce: [UInt8], receiverNonce: [UInt8]) -> [UInt8] {
        var message = Array("starling-link-v\(ClusterFrame.wireVersion)\0\(cluster)\0\(sender)\0\(receiver)\0".utf8)
        message += senderNonce
        message += receiverNonce
        message += certificateDigest
        return Array(HMAC<SHA256>.authenticationCode(for: message, using: secret))
    }

    private func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in a.indices { difference |= a[index] ^ b[index] }
        return difference == 0
    }
}
