import NIOCore
import SQLiteNIO
import StarlingAPI
import StarlingStorage

extension SQLiteStore: FASTTokenStore {
    public func fastTokens(of user: JID, client: String) async throws(StorageError) -> [StoredFASTToken] {
        // The FAST login path: one statement.
        try await run { db in
            try db.query(
                "\(Self.fastTokenColumns) WHERE host = ? AND username = ? AND client = ?", Self.userBinds(user) + [.text(client)]
            ).compactMap(Self.fastToken)
        }
    }

    public func fastTokens(of user: JID) async throws(StorageError) -> [StoredFASTToken] {
        try await run { db in
            try db.query(
                "\(Self.fastTokenColumns) WHERE host = ? AND username = ? ORDER BY client, slot", Self.userBinds(user)
            ).compactMap(Self.fastToken)
        }
    }

    public func storeFASTToken(_ token: StoredFASTToken, for user: JID, clientLimit: Int, now: Int) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                try db.query(
                    "DELETE FROM fast_tokens WHERE host = ? AND username = ? AND expires_at <= ?", Self.userBinds(user) + [.integer(now)])
                // Clients beyond the limit, least recently issued first, make room for this one.
                try db.query(
                    """
                    DELETE FROM fast_tokens WHERE host = ? AND username = ? AND client IN (
                        SELECT client FROM fast_tokens WHERE host = ? AND username = ? AND client <> ?
                        GROUP BY client ORDER BY MAX(issued_at) DESC, client LIMIT -1 OFFSET ?)
                    """,
                    Self.userBinds(user) + Self.userBinds(user) + [.text(token.client), .integer(max(clientLimit - 1, 0))])
                try db.query(
                    """
                    INSERT INTO fast_tokens (host, username, client, slot, mechanism, nonce, issued_at, expires_at, software, device)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (host, username, client, slot) DO UPDATE SET mechanism = excluded.mechanism, nonce = excluded.nonce,
                        issued_at = excluded.issued_at, expires_at = excluded.expires_at, software = excluded.software, device = excluded.device
                    """,
                    Self.userBinds(user) + [.text(token.client), .text(token.slot.rawValue), .text(token.mechanism),
                                            .blob(ByteBuffer(bytes: token.nonce)), .integer(token.issuedAt), .integer(token.expiresAt),
                                            token.software.map { .text($0) } ?? .null, token.device.map { .text($0) } ?? .null])
            }
        }
    }

    public func promoteFASTToken(of user: JID, client: String) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                let binds = Self.userBinds(user) + [.text(client)]
                let waiting = try db.query(
                    "SELECT 1 FROM fast_tokens WHERE host = ? AND username = ? AND client = ? AND slot = 'new'", binds)
                guard !waiting.isEmpty else { return }
                try db.query(
                    "DELETE FROM fast_tokens WHERE host = ? AND username = ? AND client = ? AND slot = 'current'", binds)
                try db.query(
                    "UPDATE fast_tokens SET slot = 'current' WHERE host = ? AND username = ? AND client = ? AND slot = 'new'", binds)
            }
        }
    }

    @discardableResult
    public func revokeFASTTokens(of user: JID, client: String?) async throws(StorageError) -> Int {
        try await run { db in
            let rows: [SQLiteResultRow]
            if let client {
                rows = try db.query(
                    "DELETE FROM fast_tokens WHERE host = ? AND username = ? AND client = ? RETURNING 1", Self.userBinds(user) + [.text(client)])
            } else {
                rows = try db.query("DELETE FROM fast_tokens WHERE host = ? AND username = ? RETURNING 1", Self.userBinds(user))
            }
            return rows.count
        }
    }

    private static let fastTokenColumns = "SELECT client, slot, mechanism, nonce, issued_at, expires_at, software, device FROM fast_tokens"

    private static func fastToken(_ row: SQLiteResultRow) -> StoredFASTToken? {
        guard let client = row.column("client")?.string, let slot = row.column("slot")?.string.flatMap(StoredFASTToken.Slot.init(rawValue:)),
              let mechanism = row.column("mechanism")?.string, let nonce = row.column("nonce")?.blob,
              let issuedAt = row.column("issued_at")?.integer, let expiresAt = row.column("expires_at")?.integer
        else { return nil }
        return StoredFASTToken(client: client, slot: slot, mechanism: mechanism, nonce: Array(buffer: nonce), issuedAt: issuedAt, expiresAt: expiresAt,
                               software: row.column("software")?.string, device: row.column("device")?.string)
    }
}
