import Foundation
import NIOCore
import SQLiteNIO
import StarlingSASL
import StarlingStorage

extension SQLiteStore: AccountStore {
    public func createAccount(username: String, host: String, credentials: [SCRAMCredentials]) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                if try Self.exists(db, username: username, host: host) { throw StorageError.accountExists }
                try db.query(
                    "INSERT INTO accounts (host, username, created_at) VALUES (?, ?, ?)",
                    [.text(host), .text(username), .integer(Int(Date().timeIntervalSince1970))])
                try Self.insert(db, credentials, username: username, host: host)
            }
        }
    }

    public func credentials(username: String, host: String) async throws(StorageError) -> [SCRAMCredentials]? {
        try await run { db in
            // One statement on the login path: no row means no account, a row without a hash an account
            // without credentials.
            let rows = try db.query(
                """
                SELECT c.hash, c.salt, c.iterations, c.stored_key, c.server_key
                FROM accounts a LEFT JOIN scram_credentials c ON c.host = a.host AND c.username = a.username
                WHERE a.host = ? AND a.username = ?
                """,
                [.text(host), .text(username)])
            if rows.isEmpty { return nil }
            return rows.compactMap { row -> SCRAMCredentials? in
                guard let hash = row.column("hash")?.string.flatMap(SCRAMHash.init(rawValue:)),
                      let salt = row.column("salt")?.blob, let iterations = row.column("iterations")?.integer,
                      let storedKey = row.column("stored_key")?.blob, let serverKey = row.column("server_key")?.blob
                else { return nil }
                return SCRAMCredentials(hash: hash, salt: Array(buffer: salt), iterations: iterations,
                                        storedKey: Array(buffer: storedKey), serverKey: Array(buffer: serverKey))
            }
        }
    }

    public func setCredentials(username: String, host: String, credentials: [SCRAMCredentials]) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                guard try Self.exists(db, username: username, host: host) else { throw StorageError.accountNotFound }
                try db.query(
                    "DELETE FROM scram_credentials WHERE host = ? AND username = ?", [.text(host), .text(username)])
                // A new password logs out every client holding a FAST token (a lost phone's, say).
                try db.query(
                    "DELETE FROM fast_tokens WHERE host = ? AND username = ?", [.text(host), .text(username)])
                try Self.insert(db, credentials, username: username, host: host)
            }
        }
    }

    public func deleteAccount(username: String, host: String) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                guard try Self.exists(db, username: username, host: host) else { throw StorageError.accountNotFound }
                // Everything the account owns goes with it.
                for table in StorageTables.perUser {
                    try db.query(
                        "DELETE FROM \(table) WHERE host = ? AND username = ?", [.text(host), .text(username)])
                }
            }
        }
    }

    public func accounts(host: String) async throws(StorageError) -> [String] {
        try await run { db in
            try db.query(
                "SELECT username FROM accounts WHERE host = ? ORDER BY username", [.text(host)]
            ).compactMap { $0.column("username")?.string }
        }
    }

    public func accountExists(username: String, host: String) async throws(StorageError) -> Bool {
        try await run { db in try Self.exists(db, username: username, host: host) }
    }

    private static func exists(_ db: SQLiteHandle, username: String, host: String) throws -> Bool {
        !(try db.query("SELECT 1 FROM accounts WHERE host = ? AND username = ?", [.text(host), .text(username)]).isEmpty)
    }

    private static func insert(_ db: SQLiteHandle, _ credentials: [SCRAMCredentials], username: String, host: String) throws {
        for credential in credentials {
            try db.query(
                """
                INSERT INTO scram_credentials (host, username, hash, salt, iterations, stored_key, server_key)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                """,
                [.text(host), .text(username), .text(credential.hash.rawValue), .blob(ByteBuffer(bytes: credential.salt)),
                 .integer(credential.iterations), .blob(ByteBuffer(bytes: credential.storedKey)),
                 .blob(ByteBuffer(bytes: credential.serverKey))])
        }
    }
}
