import NIOCore
import PostgresNIO
import StarlingAPI
import StarlingStorage

extension PostgresStore: FASTTokenStore {
    private typealias FASTTokenRow = (String, String, String, ByteBuffer, Int, Int, String?, String?)

    public func fastTokens(of user: JID, client: String) async throws(StorageError) -> [StoredFASTToken] {
        let (host, username) = Self.key(user)
        // The FAST login path: one round trip.
        return try await run { [postgres = self.client, logger] in
            try await Self.fastTokens(postgres.query(
                """
                SELECT client, slot, mechanism, nonce, issued_at, expires_at, software, device FROM fast_tokens
                WHERE host = \(host) AND username = \(username) AND client = \(client)
                """, logger: logger))
        }
    }

    public func fastTokens(of user: JID) async throws(StorageError) -> [StoredFASTToken] {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            try await Self.fastTokens(client.query(
                """
                SELECT client, slot, mechanism, nonce, issued_at, expires_at, software, device FROM fast_tokens
                WHERE host = \(host) AND username = \(username) ORDER BY client, slot
                """, logger: logger))
        }
    }

    public func storeFASTToken(_ token: StoredFASTToken, for user: JID, clientLimit: Int, now: Int) async throws(StorageError) {
        let (host, username) = Self.key(user)
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                // One account's issues one at a time, so the client limit holds.
                try await connection.query("SELECT pg_advisory_xact_lock(hashtext(\("fast/" + host + "/" + username)))", logger: logger)
                try await connection.query(
                    "DELETE FROM fast_tokens WHERE host = \(host) AND username = \(username) AND expires_at <= \(now)", logger: logger)
                // Clients beyond the limit, least recently issued first, make room for this one.
                try await connection.query(
                    """
                    DELETE FROM fast_tokens WHERE host = \(host) AND username = \(username) AND client IN (
                        SELECT client FROM fast_tokens WHERE host = \(host) AND username = \(username) AND client <> \(token.client)
                        GROUP BY client ORDER BY MAX(issued_at) DESC, client OFFSET \(max(clientLimit - 1, 0)))
                    """, logger: logger)
                try await connection.query(
                    """
                    INSERT INTO fast_tokens (host, username, client, slot, mechanism, nonce, issued_at, expires_at, software, device)
                    VALUES (\(host), \(username), \(token.client), \(token.slot.rawValue), \(token.mechanism), \(ByteBuffer(bytes: token.nonce)),
                            \(token.issuedAt), \(token.expiresAt), \(token.software), \(token.device))
                    ON CONFLICT (host, username, client, slot) DO UPDATE SET mechanism = excluded.mechanism, nonce = excluded.nonce,
                        issued_at = excluded.issued_at, expires_at = excluded.expires_at, software = excluded.software, device = excluded.device
                    """, logger: logger)
            }
        }
    }

    public func promoteFASTToken(of user: JID, client: String) async throws(StorageError) {
        let (host, username) = Self.key(user)
        try await run { [postgres = self.client, logger] in
            try await postgres.withTransaction(logger: logger) { connection in
                let waiting = try await connection.query(
                    "SELECT 1 FROM fast_tokens WHERE host = \(host) AND username = \(username) AND client = \(client) AND slot = 'new' FOR UPDATE",
                    logger: logger).collect()
                guard !waiting.isEmpty else { return }
                try await connection.query(
                    "DELETE FROM fast_tokens WHERE host = \(host) AND username = \(username) AND client = \(client) AND slot = 'current'", logger: logger)
                try await connection.query(
                    "UPDATE fast_tokens SET slot = 'current' WHERE host = \(host) AND username = \(username) AND client = \(client) AND slot = 'new'",
                    logger: logger)
            }
        }
    }

    @discardableResult
    public func revokeFASTTokens(of user: JID, client: String?) async throws(StorageError) -> Int {
        let (host, username) = Self.key(user)
        return try await run { [postgres = self.client, logger] in
            let rows: PostgresRowSequence
            if let client {
                rows = try await postgres.query(
                    "DELETE FROM fast_tokens WHERE host = \(host) AND username = \(username) AND client = \(client) RETURNING 1", logger: logger)
            } else {
                rows = try await postgres.query("DELETE FROM fast_tokens WHERE host = \(host) AND username = \(username) RETURNING 1", logger: logger)
            }
            return try await rows.collect().count
        }
    }

    private static func fastTokens(_ rows: PostgresRowSequence) async throws -> [StoredFASTToken] {
        var tokens: [StoredFASTToken] = []
        for try await (client, slot, mechanism, nonce, issuedAt, expiresAt, software, device) in rows.decode(FASTTokenRow.self) {
            guard let slot = StoredFASTToken.Slot(rawValue: slot) else { continue }
            tokens.append(StoredFASTToken(client: client, slot: slot, mechanism: mechanism, nonce: Array(buffer: nonce), issuedAt: issuedAt,
                                          expiresAt: expiresAt, software: software, device: device))
        }
        return tokens
    }
}
