import Foundation
import Logging
import StarlingAPI
import StarlingConfig
import StarlingSASL
import StarlingStorage

/// XEP-0484 FAST tokens over the store: checked, issued into the client's `new` slot, rotated and revoked.
/// Every node derives the same tokens from the same key, so a client may log in on any node of a cluster.
public final class FASTTokens: Sendable {
    private let store: any FASTTokenStore
    private let key: FASTTokenKey
    private let settings: FASTConfiguration
    private let now: @Sendable () -> Int

    public init(store: any FASTTokenStore, key: FASTTokenKey, settings: FASTConfiguration,
                now: @escaping @Sendable () -> Int = { Int(Date().timeIntervalSince1970) }) {
        self.store = store
        self.key = key
        self.settings = settings
        self.now = now
    }

    /// Checks the proof against the client's `new` token, then its `current` one (XEP-0484 §"Implementation
    /// notes"). Using the new token retires the current one; `invalidate` forgets the token used.
    ///
    /// The common login is one read: a token used from the `new` slot moves to `current` only when that
    /// retires an older token or a token is about to be issued into `new` (which would otherwise overwrite the
    /// one the client holds).
    public func verify(_ request: FASTVerification) async throws(StorageError) -> FASTVerificationOutcome {
        let stored = try await store.fastTokens(of: request.user, client: request.client)
        let candidates = stored.filter { $0.mechanism == request.mechanism }.sorted { $0.slot == .new && $1.slot != .new }
        for candidate in candidates {
            let token = self.token(candidate, user: request.user)
            guard HashedTokenMechanism.verify(proof: request.proof, token: token, channelBinding: request.channelBinding) else { continue }
            let time = now()
            if candidate.expiresAt <= time {
                try await store.revokeFASTTokens(of: request.user, client: request.client)
                return .failure(.credentialsExpired)
            }
            let rotate = !request.invalidate && time - candidate.issuedAt >= settings.rotateAfter
            if request.invalidate {
                try await store.revokeFASTTokens(of: request.user, client: request.client)
            } else if candidate.slot == .new && (stored.contains { $0.slot == .current } || rotate || request.requestsToken) {
                try await store.promoteFASTToken(of: request.user, client: request.client)
            }
            let proof = HashedTokenMechanism.responderProof(token: token, channelBinding: request.channelBinding)
            return .success(responderProof: proof, rotate: rotate)
        }
        return .failure(.notAuthorized)
    }

    /// Stores a new token in the client's `new` slot (replacing one it never used) and returns it.
    public func issue(_ request: FASTIssue) async throws(StorageError) -> IssuedFASTToken {
        var generator = SystemRandomNumberGenerator()
        let nonce = (0..<32).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        let issuedAt = now()
        let stored = StoredFASTToken(client: request.client, slot: .new, mechanism: request.mechanism, nonce: nonce, issuedAt: issuedAt,
                                     expiresAt: issuedAt + settings.tokenLifetime, software: request.software, device: request.device)
        try await store.storeFASTToken(stored, for: request.user, clientLimit: settings.maxClientsPerAccount, now: issuedAt)
        return IssuedFASTToken(token: token(stored, user: request.user), expiresAt: stored.expiresAt)
    }

    private func token(_ stored: StoredFASTToken, user: JID) -> String {
        key.token(host: user.domainpart, username: user.localpart ?? "", client: stored.client, nonce: stored.nonce)
    }

    /// The key's secret: `auth.fast.key_file`, else the cluster's secret (every node must agree), else
    /// `fast-token.key` in data_dir, made with 32 random bytes at first start and readable by the server only.
    public static func loadKey(_ configuration: StarlingConfiguration) throws -> FASTTokenKey {
        if let file = configuration.auth.fast.keyFile ?? configuration.cluster?.secretFile {
            return FASTTokenKey(secret: Array(try secret(at: file).utf8))
        }
        let path = URL(fileURLWithPath: configuration.dataDirectory).appendingPathComponent("fast-token.key").path
        // Created exclusively: two servers starting on one data_dir never overwrite each other's key.
        let descriptor = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        if descriptor >= 0 {
            var generator = SystemRandomNumberGenerator()
            let text = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: .min ... .max, using: &generator)) }.joined() + "\n"
            let written = text.withCString { write(descriptor, $0, strlen($0)) }
            close(descriptor)
            guard written == text.utf8.count else { throw FASTKeyError(message: "cannot write \(path)") }
        } else if errno != EEXIST {
            throw FASTKeyError(message: "cannot create \(path): \(String(cString: strerror(errno)))")
        }
        return FASTTokenKey(secret: Array(try secret(at: path).utf8))
    }

    private static func secret(at path: String) throws -> String {
        guard let contents = FileManager.default.contents(atPath: path) else { throw FASTKeyError(message: "cannot read \(path)") }
        let secret = String(decoding: contents, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard secret.count >= 16 else { throw FASTKeyError(message: "\(path) holds fewer than 16 characters") }
        return secret
    }
}

struct FASTKeyError: Error, CustomStringConvertible {
    var message: String
    var description: String { "FAST token key: \(message)" }
}

/// A FAST token proof to check: the handler looks up the client's stored tokens.
public struct FASTVerification: Sendable, Equatable {
    public var user: JID
    /// The SASL2 user-agent id.
    public var client: String
    public var mechanism: String
    public var proof: [UInt8]
    /// The mechanism's channel-binding data (empty for `-NONE`).
    public var channelBinding: [UInt8]
    /// Forget the token once it has proven itself (`<fast invalidate='true'/>`).
    public var invalidate: Bool
    /// The same request asks for a new token (`<request-token/>`), which will take the `new` slot.
    public var requestsToken = false

    public init(user: JID, client: String, mechanism: String, proof: [UInt8], channelBinding: [UInt8], invalidate: Bool, requestsToken: Bool = false) {
        self.user = user
        self.client = client
        self.mechanism = mechanism
        self.proof = proof
        self.channelBinding = channelBinding
        self.invalidate = invalidate
        self.requestsToken = requestsToken
    }
}

public enum FASTVerificationOutcome: Sendable, Equatable {
    /// The proof matched an unexpired token for this mechanism; `rotate`: issue the client a replacement.
    case success(responderProof: [UInt8], rotate: Bool)
    case failure(SASLFailure)
}

/// A FAST token to issue into the client's `new` slot.
public struct FASTIssue: Sendable, Equatable {
    public var user: JID
    public var client: String
    public var mechanism: String
    public var software: String?
    public var device: String?

    public init(user: JID, client: String, mechanism: String, software: String? = nil, device: String? = nil) {
        self.user = user
        self.client = client
        self.mechanism = mechanism
        self.software = software
        self.device = device
    }
}

/// An issued token as the client receives it.
public struct IssuedFASTToken: Sendable, Equatable {
    public var token: String
    /// Seconds since 1970.
    public var expiresAt: Int

    public init(token: String, expiresAt: Int) {
        self.token = token
        self.expiresAt = expiresAt
    }
}

