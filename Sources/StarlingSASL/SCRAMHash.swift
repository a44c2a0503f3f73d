import Crypto
import _CryptoExtras
import Foundation

/// The hash functions SCRAM is offered with (RFC 5802 SCRAM-SHA-1, RFC 7677 SCRAM-SHA-256).
public enum SCRAMHash: String, Sendable, CaseIterable, Codable {
    case sha1 = "SHA-1"
    case sha256 = "SHA-256"

    /// The SASL mechanism name, with or without channel binding.
    public func mechanism(plus: Bool) -> String { "SCRAM-\(rawValue)\(plus ? "-PLUS" : "")" }

    public var outputByteCount: Int {
        switch self {
        case .sha1: return Insecure.SHA1.byteCount
        case .sha256: return SHA256.byteCount
        }
    }

    public func hash(_ data: [UInt8]) -> [UInt8] {
        switch self {
        case .sha1: return Array(Insecure.SHA1.hash(data: data))
        case .sha256: return Array(SHA256.hash(data: data))
        }
    }

    public func hmac(key: [UInt8], _ data: [UInt8]) -> [UInt8] {
        let key = SymmetricKey(data: key)
        switch self {
        case .sha1: return Array(HMAC<Insecure.SHA1>.authenticationCode(for: data, using: key))
        case .sha256: return Array(HMAC<SHA256>.authenticationCode(for: data, using: key))
        }
    }

    /// Hi() of RFC 5802 §2.2, i.e. PBKDF2 with this hash's HMAC.
    public func saltedPassword(_ password: String, salt: [UInt8], iterations: Int) -> [UInt8] {
        let function: KDF.Insecure.PBKDF2.HashFunction = self == .sha1 ? .insecureSHA1 : .sha256
        let prepared = SCRAMHash.prepare(password: password)
        // PBKDF2 only fails for zero rounds or output length, which the callers never pass.
        let key = try! KDF.Insecure.PBKDF2.deriveKey(
            from: Array(prepared.utf8), salt: salt, using: function,
            outputByteCount: outputByteCount, unsafeUncheckedRounds: iterations
        )
        return key.withUnsafeBytes { Array($0) }
    }

    /// Password preparation: OpaqueString-style (non-ASCII spaces to U+0020, then NFC), as RFC 7677
    /// asks via RFC 8265.
    public static func prepare(password: String) -> String {
        var scalars = String.UnicodeScalarView()
        for scalar in password.unicodeScalars {
            scalars.append(scalar.properties.generalCategory == .spaceSeparator ? " " : scalar)
        }
        return String(scalars).precomposedStringWithCanonicalMapping
    }
}

/// What the server stores for one account and one hash: never the password itself (RFC 5802 §3).
public struct SCRAMCredentials: Sendable, Equatable, Codable {
    public var hash: SCRAMHash
    public var salt: [UInt8]
    public var iterations: Int
    public var storedKey: [UInt8]
    public var serverKey: [UInt8]

    public init(hash: SCRAMHash, salt: [UInt8], iterations: Int, storedKey: [UInt8], serverKey: [UInt8]) {
        self.hash = hash
        self.salt = salt
        self.iterations = iterations
        self.storedKey = storedKey
        self.serverKey = serverKey
    }

    /// Derives the stored keys from a password. Costs `iterations` HMACs: call it off the event loop.
    public static func derive(password: String, hash: SCRAMHash, salt: [UInt8], iterations: Int) -> SCRAMCredentials {
        let salted = hash.saltedPassword(password, salt: salt, iterations: iterations)
        let clientKey = hash.hmac(key: salted, Array("Client Key".utf8))
        let serverKey = hash.hmac(key: salted, Array("Server Key".utf8))
        return SCRAMCredentials(hash: hash, salt: salt, iterations: iterations, storedKey: hash.hash(clientKey), serverKey: serverKey)
    }

    /// Fresh credentials with a random 16-byte salt.
    public static func generate(password: String, hash: SCRAMHash, iterations: Int) -> SCRAMCredentials {
        var salt = [UInt8](repeating: 0, count: 16)
        var generator = SystemRandomNumberGenerator()
        for index in salt.indices { salt[index] = generator.next() }
        return derive(password: password, hash: hash, salt: salt, iterations: iterations)
    }

    /// True when `password` is the one these credentials were derived from (for SASL PLAIN).
    /// Costs `iterations` HMACs: call it off the event loop.
    public func verify(password: String) -> Bool {
        let candidate = SCRAMCredentials.derive(password: password, hash: hash, salt: salt, iterations: iterations)
        return constantTimeEqual(candidate.storedKey, storedKey)
    }
}

func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var difference: UInt8 = 0
    for index in a.indices { difference |= a[index] ^ b[index] }
    return difference == 0
}

func randomNonce() -> String {
    // 18 bytes from three 64-bit draws: each draw is a getrandom system call.
    var generator = SystemRandomNumberGenerator()
    let words = (0..<3).map { _ in generator.next() as UInt64 }
    let bytes = words.withUnsafeBytes { Array($0.prefix(18)) }
    return Data(bytes).base64EncodedString()
}
