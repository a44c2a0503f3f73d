import StarlingAPI

/// One XEP-0484 (FAST) token as stored. The token itself is never stored: it is derived from the server's
/// token key and `nonce`, so the database alone cannot log anyone in.
public struct StoredFASTToken: Sendable, Equatable {
    /// XEP-0484 §"Implementation notes": a client holds at most two tokens, the one it uses and the one it
    /// was last given (until it uses that one).
    public enum Slot: String, Sendable, CaseIterable {
        case current
        case new
    }

    /// The client's SASL2 `<user-agent id/>`: tokens belong to one installation of one client.
    public var client: String
    public var slot: Slot
    /// The FAST mechanism the token was issued for (`HT-SHA-256-NONE`, ...); other mechanisms may not use it.
    public var mechanism: String
    public var nonce: [UInt8]
    /// Seconds since 1970.
    public var issuedAt: Int
    public var expiresAt: Int
    /// What the client said it is (`<software/>`, `<device/>`), for operators listing tokens.
    public var software: String?
    public var device: String?

    public init(client: String, slot: Slot, mechanism: String, nonce: [UInt8], issuedAt: Int, expiresAt: Int,
                software: String? = nil, device: String? = nil) {
        self.client = client
        self.slot = slot
        self.mechanism = mechanism
        self.nonce = nonce
        self.issuedAt = issuedAt
        self.expiresAt = expiresAt
        self.software = software
        self.device = device
    }
}

/// XEP-0484 FAST tokens, per account and client, in two slots.
public protocol FASTTokenStore: Sendable {
    /// The client's tokens (at most one per slot), expired ones included: the caller decides.
    func fastTokens(of user: JID, client: String) async throws(StorageError) -> [StoredFASTToken]
    /// Every token the account holds, ordered by client then slot (for listing).
    func fastTokens(of user: JID) async throws(StorageError) -> [StoredFASTToken]
    /// Puts `token` into its slot (replacing what was there) and drops the account's expired tokens. When the
    /// account already has `clientLimit` other clients with tokens, the ones issued longest ago lose theirs.
    func storeFASTToken(_ token: StoredFASTToken, for user: JID, clientLimit: Int, now: Int) async throws(StorageError)
    /// The client used the token in its `new` slot: it becomes `current`, and the older one is gone.
    func promoteFASTToken(of user: JID, client: String) async throws(StorageError)
    /// Removes the client's tokens, or every token of the account when `client` is nil; returns how many.
    @discardableResult
    func revokeFASTTokens(of user: JID, client: String?) async throws(StorageError) -> Int
}
