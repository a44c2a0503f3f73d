import Crypto
import Foundation

/// The Hashed Token SASL mechanisms (draft-schmaus-kitten-sasl-ht) that XEP-0484 (FAST) logs in with: one
/// round trip, the token as HMAC key, no PBKDF2.
public enum HashedTokenMechanism: String, Sendable, CaseIterable {
    /// Bound to the TLS server certificate (`tls-server-end-point`, RFC 5929).
    case sha256Endpoint = "HT-SHA-256-ENDP"
    /// No channel binding (web clients, which cannot see the TLS layer).
    case sha256None = "HT-SHA-256-NONE"

    /// The channel-binding type the mechanism needs, or nil for none.
    public var channelBindingType: String? {
        switch self {
        case .sha256Endpoint: return "tls-server-end-point"
        case .sha256None: return nil
        }
    }

    /// What the client sends: `authcid NUL HMAC(token, "Initiator" || cb-data)`.
    public static func initialResponse(username: String, token: String, channelBinding: [UInt8]) -> [UInt8] {
        Array(username.utf8) + [0] + initiatorProof(token: token, channelBinding: channelBinding)
    }

    public static func initiatorProof(token: String, channelBinding: [UInt8]) -> [UInt8] {
        SCRAMHash.sha256.hmac(key: Array(token.utf8), Array("Initiator".utf8) + channelBinding)
    }

    /// What the server answers in `<additional-data/>`, proving it knew the token too.
    public static func responderProof(token: String, channelBinding: [UInt8]) -> [UInt8] {
        SCRAMHash.sha256.hmac(key: Array(token.utf8), Array("Responder".utf8) + channelBinding)
    }

    /// Whether `proof` is the initiator's proof for `token`, compared in constant time.
    public static func verify(proof: [UInt8], token: String, channelBinding: [UInt8]) -> Bool {
        constantTimeEqual(proof, initiatorProof(token: token, channelBinding: channelBinding))
    }
}

/// A Hashed Token initial response: who, and the proof.
public struct HashedTokenMessage: Sendable, Equatable {
    public var username: String
    public var proof: [UInt8]

    public init(parsing bytes: [UInt8]) throws(SASLFailure) {
        // The proof is binary and may hold NUL bytes itself: only the first NUL separates.
        guard let separator = bytes.firstIndex(of: 0), separator > 0,
              let username = String(validating: bytes[..<separator], as: UTF8.self)
        else { throw .malformedRequest }
        let proof = Array(bytes[(separator + 1)...])
        guard proof.count == SHA256.byteCount else { throw .malformedRequest }
        self.username = username
        self.proof = proof
    }
}

/// Derives FAST tokens from a server-side key, so a stored token is only a nonce: reading the database
/// without the key file logs nobody in (the Hashed Token mechanisms need the token itself as HMAC key, so a
/// one-way hash of it could not be checked).
public struct FASTTokenKey: Sendable {
    private let key: [UInt8]

    /// `secret` is the key file's contents (or the cluster's shared secret): every node must derive the same.
    public init(secret: [UInt8]) {
        key = Array(SHA256.hash(data: Array("starling fast token key\u{0}".utf8) + secret))
    }

    /// The token for one stored nonce, bound to the account and client it was issued to.
    public func token(host: String, username: String, client: String, nonce: [UInt8]) -> String {
        var message: [UInt8] = []
        for part in [host, username, client] { message += Array(part.utf8) + [0] }
        message += nonce
        let mac = Data(SCRAMHash.sha256.hmac(key: key, message))
        let text = mac.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        return "fast-" + text.trimmingCharacters(in: CharacterSet(charactersIn: "="))
    }
}
