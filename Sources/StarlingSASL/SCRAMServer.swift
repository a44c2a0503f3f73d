import Foundation

/// The server side of one SCRAM exchange (RFC 5802 §5, RFC 7677), as a state machine that returns what
/// to send. It never sees a password: only the stored keys.
public struct SCRAMServer: Sendable {
    /// What the caller does after the client's first message.
    public enum FirstStep: Sendable, Equatable {
        /// Look up the credentials for `username` and call `receiveCredentials`.
        case lookUpCredentials(username: String, authzid: String?)
        case fail(SASLFailure)
    }

    public enum Step: Sendable, Equatable {
        /// Send this challenge.
        case challenge([UInt8])
        /// Authentication succeeded: send this as `<success/>` data.
        case success(additionalData: [UInt8], username: String, authzid: String?)
        case fail(SASLFailure)
    }

    private enum State: Sendable {
        case awaitingClientFirst
        case awaitingCredentials(ClientFirst)
        case awaitingClientFinal(ClientFirst, credentials: SCRAMCredentials?, serverFirst: String, nonce: String)
        case finished
    }

    private struct ClientFirst: Sendable {
        var gs2Header: String
        var bare: String
        var username: String
        var authzid: String?
        var clientNonce: String
    }

    public let hash: SCRAMHash
    /// True for the -PLUS variant.
    public let plus: Bool
    private let channelBinding: ChannelBinding?
    private let advertisedPlus: Bool
    private let serverNonce: String
    private var state: State = .awaitingClientFirst

    /// - Parameters:
    ///   - plus: the client chose SCRAM-*-PLUS.
    ///   - channelBinding: what this connection's TLS offers, if anything.
    ///   - advertisedPlus: the server offered -PLUS mechanisms (so a client saying "y" is being downgraded).
    ///   - serverNonce: fixed only by tests reproducing RFC vectors.
    public init(hash: SCRAMHash, plus: Bool, channelBinding: ChannelBinding?, advertisedPlus: Bool, serverNonce: String? = nil) {
        self.hash = hash
        self.plus = plus
        self.channelBinding = channelBinding
        self.advertisedPlus = advertisedPlus
        self.serverNonce = serverNonce ?? randomNonce()
    }

    /// True until the client's first message arrived (it may come after an empty challenge).
    public var isAwaitingClientFirst: Bool {
        if case .awaitingClientFirst = state { return true }
        return false
    }

    public mutating func receiveClientFirst(_ message: [UInt8]) -> FirstStep {
        guard case .awaitingClientFirst = state else { return fail(.malformedRequest) }
        guard let text = String(validating: message, as: UTF8.self) else { return fail(.incorrectEncoding) }
        // gs2-header = cbind-flag "," [authzid] ","
        let fields = text.split(separator: ",", maxSplits: 2, omittingEmptySubsequences: false)
        guard fields.count == 3 else { return fail(.malformedRequest) }
        let flag = fields[0]
        switch true {
        case flag == "n":
            if plus { return fail(.malformedRequest) }
        case flag == "y":
            // The client could bind but believes we can't: if we offered -PLUS, someone stripped it.
            if plus || advertisedPlus { return fail(.notAuthorized) }
        case flag.hasPrefix("p="):
            guard plus, let channelBinding, flag.dropFirst(2) == channelBinding.type else { return fail(.notAuthorized) }
        default:
            return fail(.malformedRequest)
        }
        var authzid: String?
        if !fields[1].isEmpty {
            guard fields[1].hasPrefix("a="), let decoded = Self.decodeSaslName(fields[1].dropFirst(2)) else {
                return fail(.malformedRequest)
            }
            authzid = decoded
        }
        let bare = String(fields[2])
        var username: String?
        var nonce: String?
        for (index, attribute) in bare.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
            if index == 0 && attribute.hasPrefix("m=") { return fail(.malformedRequest) }
            // attr-val = ALPHA "=" value (RFC 5802 §7)
            guard attribute.count >= 2, attribute.first!.isASCII, attribute.first!.isLetter,
                  attribute[attribute.index(after: attribute.startIndex)] == "=" else { return fail(.malformedRequest) }
            if attribute.hasPrefix("n=") { username = Self.decodeSaslName(attribute.dropFirst(2)) }
            if attribute.hasPrefix("r=") { nonce = String(attribute.dropFirst(2)) }
        }
        guard let username, !username.isEmpty, let nonce, !nonce.isEmpty, !nonce.contains(",") else {
            return fail(.malformedRequest)
        }
        let gs2Header = "\(flag),\(fields[1]),"
        let first = ClientFirst(gs2Header: gs2Header, bare: bare, username: username, authzid: authzid, clientNonce: nonce)
        state = .awaitingCredentials(first)
        return .lookUpCredentials(username: username, authzid: authzid)
    }

    /// Continues with the account's stored credentials, or nil for an unknown account (the exchange then
    /// runs on with made-up values and fails at the end, so unknown and known users look alike).
    public mutating func receiveCredentials(_ credentials: SCRAMCredentials?) -> Step {
        guard case .awaitingCredentials(let first) = state else { return failStep(.malformedRequest) }
        let usable = credentials.flatMap { $0.hash == hash ? $0 : nil }
        let salt = usable?.salt ?? Array(hash.hash(Array("starling-unknown-user:\(first.username)".utf8)).prefix(16))
        let iterations = usable?.iterations ?? 4096
        let nonce = first.clientNonce + serverNonce
        let serverFirst = "r=\(nonce),s=\(Data(salt).base64EncodedString()),i=\(iterations)"
        state = .awaitingClientFinal(first, credentials: usable, serverFirst: serverFirst, nonce: nonce)
        return .challenge(Array(serverFirst.utf8))
    }

    public mutating func receiveClientFinal(_ message: [UInt8]) -> Step {
        guard case .awaitingClientFinal(let first, let credentials, let serverFirst, let nonce) = state else {
            return failStep(.malformedRequest)
        }
        guard String(validating: message, as: UTF8.self) != nil else { return failStep(.incorrectEncoding) }
        guard let proofStart = message.indices.dropLast(2).first(where: {
            message[$0] == UInt8(ascii: ",") && message[$0 + 1] == UInt8(ascii: "p") && message[$0 + 2] == UInt8(ascii: "=")
        }) else { return failStep(.malformedRequest) }
        let withoutProof = String(decoding: message[..<proofStart], as: UTF8.self)
        guard let proof = Data(base64Encoded: Data(message[(proofStart + 3)...])) else {
            return failStep(.incorrectEncoding)
        }
        var binding: String?
        var finalNonce: String?
        for attribute in withoutProof.split(separator: ",") {
            if attribute.hasPrefix("c=") { binding = String(attribute.dropFirst(2)) }
            if attribute.hasPrefix("r=") { finalNonce = String(attribute.dropFirst(2)) }
        }
        guard let binding, let finalNonce, let bindingBytes = Data(base64Encoded: binding) else {
            return failStep(.malformedRequest)
        }
        var expectedBinding = Array(first.gs2Header.utf8)
        if plus, let channelBinding { expectedBinding += channelBinding.data }
        guard finalNonce == nonce, constantTimeEqual(Array(bindingBytes), expectedBinding) else {
            return failStep(.notAuthorized)
        }
        guard let credentials, proof.count == hash.outputByteCount else { return failStep(.notAuthorized) }
        let authMessage = Array("\(first.bare),\(serverFirst),\(withoutProof)".utf8)
        let clientSignature = hash.hmac(key: credentials.storedKey, authMessage)
        let clientKey = zip(proof, clientSignature).map { $0 ^ $1 }
        guard constantTimeEqual(hash.hash(clientKey), credentials.storedKey) else { return failStep(.notAuthorized) }
        let serverSignature = hash.hmac(key: credentials.serverKey, authMessage)
        state = .finished
        return .success(
            additionalData: Array("v=\(Data(serverSignature).base64EncodedString())".utf8),
            username: first.username,
            authzid: first.authzid
        )
    }

    /// saslname decoding: `=2C` is ",", `=3D` is "="; any other "=" is malformed.
    static func decodeSaslName(_ encoded: Substring) -> String? {
        var result = ""
        var index = encoded.startIndex
        while index < encoded.endIndex {
            let character = encoded[index]
            if character == "=" {
                let code = encoded[index...].prefix(3)
                switch code {
                case "=2C": result.append(",")
                case "=3D": result.append("=")
                default: return nil
                }
                index = encoded.index(index, offsetBy: 3)
            } else {
                result.append(character)
                index = encoded.index(after: index)
            }
        }
        return result
    }

    static func encodeSaslName(_ name: String) -> String {
        name.replacingOccurrences(of: "=", with: "=3D").replacingOccurrences(of: ",", with: "=2C")
    }

    private mutating func fail(_ failure: SASLFailure) -> FirstStep {
        state = .finished
        return .fail(failure)
    }

    private mutating func failStep(_ failure: SASLFailure) -> Step {
        state = .finished
        return .fail(failure)
    }
}
