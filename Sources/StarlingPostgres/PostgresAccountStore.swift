import Foundation
import PostgresNIO
import StarlingSASL
import StarlingStorage

extension PostgresStore: AccountStore {
    public func createAccount(username: String, host: String, credentials: [SCRAMCredentials]) async throws(StorageError) {
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                let inserted = try await connection.query(
                    "INSERT INTO accounts (host, username, created_at) VALUES (\(host), \(username), \(Int(Date().timeIntervalSince1970))) ON CONFLICT DO NOTHING RETURNING 1",
                    logger: logger).collect()
                if inserted.isEmpty { throw StorageError.accountExists }
                try await Self.insert(credentials, username: username, host: host, on: connection, logger: logger)
            }
        }
    }

    public func credentials(username: String, host: String) async throws(StorageError) -> [SCRAMCredentials]? {
        try await run { [client, logger] in
            // One round trip on the login path: no row means no account, a row without a hash an account
            // without credentials.
            var result: [SCRAMCredentials] = []
            var found = false
            let rows = try await client.query(
                """
                SELECT c.hash, c.salt, c.iterations, c.stored_key, c.server_key
                FROM accounts a LEFT JOIN scram_credentials c ON c.host = a.host AND c.username = a.username
                WHERE a.host = \(host) AND a.username = \(username)
                """,
                logger: logger)
            for try await (hash, salt, iterations, storedKey, serverKey) in rows.decode((String?, ByteBuffer?, Int?, ByteBuffer?, ByteBuffer?).self) {
                found = true
                guard let hash = hash.flatMap(SCRAMHash.init(rawValue:)), let salt, let iterations, let storedKey, let serverKey else { continue }
                result.append(SCRAMCredentials(hash: hash, salt: Array(buffer: salt), iterations: iterations,
                                               storedKey: Array(buffer: storedKey), serverKey: Array(buffer: serverKey)))
            }
            return found ? result : nil
        }
    }

    public func setCredentials(username: String, host: String, credentials: [SCRAMCredentials]) async throws(StorageError) {
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                let found = try await connection.query(
                    "SELECT 1 FROM accounts WHERE host = \(host) AND username = \(username) FOR UPDATE", logger: logger).collect()
                if found.isEmpty { throw StorageError.accountNotFound }
                try await connection.query("DELETE FROM scram_credentials WHERE host = \(host) AND username = \(username)", logger: logger)
                // A new password logs out every client holding a FAST token (a lost phone's, say).
                try await connection.query("DELETE FROM fast_tokens WHERE host = \(host) AND username = \(username)", logger: logger)
                try await Self.insert(credentials, username: username, host: host, on: connection, logger: logger)
            }
        }
    }

    public func deleteAccount(username: String, host: String) async throws(StorageError) {
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                let found = try await connection.query(
                    "SELECT 1 FROM accounts WHERE host = \(host) AND username = \(username) FOR UPDATE", logger: logger).collect()
                if found.isEmpty { throw StorageError.accountNotFound }
                // Everything the account owns goes with it.
                for table in StorageTables.perUser {
                    try await connection.query(PostgresQuery(unsafeSQL: "DELETE FROM \(table) WHERE host = $1 AND username = $2",
                                                             binds: Self.binds(host, username)), logger: logger)
                }
            }
        }
    }

    public func accounts(host: String) async throws(StorageError) -> [String] {
        try await run { [client, logger] in
            var names: [String] = []
            for try await name in try await client.query("SELECT username FROM accounts WHERE host = \(host) ORDER BY username", logger: logger).decode(String.self) {
                names.append(name)
            }
            return names
        }
    }

    public func accountExists(username: String, host: String) async throws(StorageError) -> Bool {
        try await run { [client] in try await Self.exists(username: username, host: host, client: client) }
    }

    static func exists(username: String, host: String, client: PostgresClient) async throws -> Bool {
        !(try await client.query("SELECT 1 FROM accounts WHERE host = \(host) AND username = \(username)").collect().isEmpty)
    }

    static func binds(_ values: String...) -> PostgresBindings {
        var bindings = PostgresBindings()
        for value in values { bindings.append(value) }
        return bindings
    }

    private static func insert(_ credentials: [SCRAMCredentials], username: String, host: String, on connection: PostgresConnection, logger: Logger) async throws {
        for credential in credentials {
            try await connection.query(
                """
                INSERT INTO scram_credentials (host, username, hash, salt, iterations, stored_key, server_key)
                VALUES (\(host), \(username), \(credential.hash.rawValue), \(ByteBuffer(bytes: credential.salt)), \(credential.iterations),
                        \(ByteBuffer(bytes: credential.storedKey)), \(ByteBuffer(bytes: credential.serverKey)))
                """, logger: logger)
        }
    }
}
