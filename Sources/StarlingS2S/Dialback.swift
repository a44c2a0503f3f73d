import Crypto
import Foundation

/// Server Dialback keys (XEP-0220 §2.1.1, generated as XEP-0185 recommends): an HMAC over the domain
/// pair and the stream id, keyed with the hash of a secret. Every node of a cluster shares the secret,
/// so whichever node the receiving server calls back can verify a key another node gave out.
public struct DialbackKeys: Sendable {
    private let keyBytes: [UInt8]

    /// - Parameter secret: the shared secret; never sent anywhere.
    public init(secret: [UInt8]) {
        let hashedSecret = SHA256.hash(data: secret).map { String(format: "%02x", $0) }.joined()
        keyBytes = Array(hashedSecret.utf8)
    }

    /// The key for a stream from `originating` to `receiving` that the receiving server identified as `streamID`.
    public func key(receiving: String, originating: String, streamID: String) -> String {
        let text = "\(receiving) \(originating) \(streamID)"
        return HMAC<SHA256>.authenticationCode(for: Array(text.utf8), using: SymmetricKey(data: keyBytes)).map { String(format: "%02x", $0) }.joined()
    }

    /// Whether `candidate` is the key for that stream (compared in constant time).
    public func verify(_ candidate: String, receiving: String, originating: String, streamID: String) -> Bool {
        let expected = Array(key(receiving: receiving, originating: originating, streamID: streamID).utf8)
        let given = Array(candidate.trimmingCharacters(in: .whitespacesAndNewlines).utf8)
        guard expected.count == given.count else { return false }
        var difference: UInt8 = 0
        for (a, b) in zip(expected, given) { difference |= a ^ b }
        return difference == 0
    }
}

/// XEP-0220's namespaces.
public enum DialbackNamespace {
    public static let stream = "jabber:server:dialback"
    public static let feature = "urn:xmpp:features:dialback"
}
