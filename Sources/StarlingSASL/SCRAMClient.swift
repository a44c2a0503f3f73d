import Foundation

/// The client side of SCRAM, for our test client and load generator.
public struct SCRAMClient: Sendable {
    public enum ClientError: Error, Equatable {
        case malformedServerMessage
        case nonceMismatch
        case badServerSignature
    }

    public let hash: SCRAMHash
    private let username: String
    private let password: String
    private let clientNonce: String
    private let gs2Header: String
    private let channelBindingData: [UInt8]
    private var authMessage: [UInt8] = []
    private var saltedPassword: [UInt8] = []
    private let derive: @Sendable (_ password: String, _ salt: [UInt8], _ iterations: Int) -> [UInt8]

    /// - Parameters:
    ///   - channelBinding: set for -PLUS.
    ///   - supportsChannelBinding: without `channelBinding`, send "y" (we could bind, the server offered
    ///     no -PLUS) instead of "n" (we can't bind).
    ///   - derive: computes SaltedPassword; a client may cache it per salt and iteration count
    ///     (RFC 5802 §5.1), as the load generator does. Default: PBKDF2 every time.
    public init(hash: SCRAMHash, username: String, password: String, authzid: String? = nil,
                channelBinding: ChannelBinding? = nil, supportsChannelBinding: Bool = false, clientNonce: String? = nil,
                derive: (@Sendable (_ password: String, _ salt: [UInt8], _ iterations: Int) -> [UInt8])? = nil) {
        self.hash = hash
        self.derive = derive ?? { [hash] password, salt, iterations in hash.saltedPassword(password, salt: salt, iterations: iterations) }
        self.username = username
        self.password = password
        self.clientNonce = clientNonce ?? randomNonce()
        let flag = channelBinding.map { "p=\($0.type)" } ?? (supportsChannelBinding ? "y" : "n")
        let authz = authzid.map { "a=\(SCRAMServer.encodeSaslName($0))" } ?? ""
        self.gs2Header = "\(flag),\(authz),"
        self.channelBindingData = channelBinding?.data ?? []
    }

    private var clientFirstBare: String { "n=\(SCRAMServer.encodeSaslName(username)),r=\(clientNonce)" }

    public func clientFirst() -> [UInt8] { Array((gs2Header + clientFirstBare).utf8) }

    public mutating func clientFinal(serverFirst: [UInt8]) throws(ClientError) -> [UInt8] {
        guard let text = String(validating: serverFirst, as: UTF8.self) else { throw .malformedServerMessage }
        var nonce: String?
        var salt: Data?
        var iterations: Int?
        for attribute in text.split(separator: ",") {
            if attribute.hasPrefix("r=") { nonce = String(attribute.dropFirst(2)) }
            if attribute.hasPrefix("s=") { salt = Data(base64Encoded: String(attribute.dropFirst(2))) }
            if attribute.hasPrefix("i=") { iterations = Int(attribute.dropFirst(2)) }
        }
        guard let nonce, let salt, let iterations, iterations > 0 else { throw .malformedServerMessage }
        guard nonce.hasPrefix(clientNonce) else { throw .nonceMismatch }
        saltedPassword = derive(password, Array(salt), iterations)
        let binding = Data(Array(gs2Header.utf8) + channelBindingData).base64EncodedString()
        let withoutProof = "c=\(binding),r=\(nonce)"
        authMessage = Array("\(clientFirstBare),\(text),\(withoutProof)".utf8)
        let clientKey = hash.hmac(key: saltedPassword, Array("Client Key".utf8))
        let clientSignature = hash.hmac(key: hash.hash(clientKey), authMessage)
        let proof = zip(clientKey, clientSignature).map { $0 ^ $1 }
        return Array("\(withoutProof),p=\(Data(proof).base64EncodedString())".utf8)
    }

    public func verify(serverFinal: [UInt8]) throws(ClientError) {
        guard let text = String(validating: serverFinal, as: UTF8.self), text.hasPrefix("v="),
              let signature = Data(base64Encoded: String(text.dropFirst(2)))
        else { throw .malformedServerMessage }
        let serverKey = hash.hmac(key: saltedPassword, Array("Server Key".utf8))
        guard constantTimeEqual(Array(signature), hash.hmac(key: serverKey, authMessage)) else { throw .badServerSignature }
    }
}
