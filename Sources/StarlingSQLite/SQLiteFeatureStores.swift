import Foundation
import SQLiteNIO
import StarlingAPI
import StarlingStorage

extension SQLiteStore: OfflineStore {
    public func storeOffline(_ stanza: String, for user: JID, limit: Int) async throws(StorageError) -> Bool {
        try await run { db in
            try db.transaction {
                let count = try db.query(
                    "SELECT COUNT(*) AS n FROM offline_messages WHERE host = ? AND username = ?", Self.userBinds(user)
                ).first?.column("n")?.integer ?? 0
                guard count < limit else { return false }
                try db.query(
                    "INSERT INTO offline_messages (host, username, stanza, stored_at) VALUES (?, ?, ?, ?)",
                    Self.userBinds(user) + [.text(stanza), .integer(Int(Date().timeIntervalSince1970))])
                return true
            }
        }
    }

    public func takeOffline(for user: JID) async throws(StorageError) -> [String] {
        // One statement, atomic on its own: most logins find nothing, and this is on the login path.
        try await run { db in
            try db.query(
                "DELETE FROM offline_messages WHERE host = ? AND username = ? RETURNING id, stanza", Self.userBinds(user)
            ).compactMap { row -> (Int, String)? in
                guard let id = row.column("id")?.integer, let stanza = row.column("stanza")?.string else { return nil }
                return (id, stanza)
            }.sorted { $0.0 < $1.0 }.map(\.1)
        }
    }

    public func offlineMessages(for user: JID) async throws(StorageError) -> [String] {
        try await run { db in
            try db.query(
                "SELECT stanza FROM offline_messages WHERE host = ? AND username = ? ORDER BY id", Self.userBinds(user)
            ).compactMap { $0.column("stanza")?.string }
        }
    }

    public func offlineCount(for user: JID) async throws(StorageError) -> Int {
        try await run { db in
            try db.query(
                "SELECT COUNT(*) AS n FROM offline_messages WHERE host = ? AND username = ?", Self.userBinds(user)
            ).first?.column("n")?.integer ?? 0
        }
    }
}

extension SQLiteStore: BlocklistStore {
    public func blocklist(of user: JID) async throws(StorageError) -> [JID] {
        try await run { db in
            try db.query(
                "SELECT item FROM blocklist WHERE host = ? AND username = ? ORDER BY item", Self.userBinds(user)
            ).compactMap { $0.column("item")?.string.flatMap(JID.init) }
        }
    }

    public func block(_ items: [JID], for user: JID) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                for item in items {
                    try db.query(
                        "INSERT INTO blocklist (host, username, item) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        Self.userBinds(user) + [.text(item.description)])
                }
            }
        }
    }

    public func unblock(_ items: [JID], for user: JID) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                if items.isEmpty {
                    try db.query("DELETE FROM blocklist WHERE host = ? AND username = ?", Self.userBinds(user))
                }
                for item in items {
                    try db.query(
                        "DELETE FROM blocklist WHERE host = ? AND username = ? AND item = ?", Self.userBinds(user) + [.text(item.description)])
                }
            }
        }
    }
}

extension SQLiteStore: PrivateXMLStore {
    public func privateXML(of user: JID, name: String, namespace: String) async throws(StorageError) -> String? {
        try await run { db in
            try db.query(
                "SELECT xml FROM private_xml WHERE host = ? AND username = ? AND name = ? AND namespace = ?",
                Self.userBinds(user) + [.text(name), .text(namespace)]
            ).first?.column("xml")?.string
        }
    }

    public func allPrivateXML(of user: JID) async throws(StorageError) -> [String] {
        try await run { db in
            try db.query(
                "SELECT xml FROM private_xml WHERE host = ? AND username = ? ORDER BY namespace, name", Self.userBinds(user)
            ).compactMap { $0.column("xml")?.string }
        }
    }

    public func setPrivateXML(_ xml: String, of user: JID, name: String, namespace: String) async throws(StorageError) {
        try await run { db in
            try db.query(
                """
                INSERT INTO private_xml (host, username, name, namespace, xml) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (host, username, name, namespace) DO UPDATE SET xml = excluded.xml
                """, Self.userBinds(user) + [.text(name), .text(namespace), .text(xml)])
        }
    }
}

extension SQLiteStore: VCardStore {
    public func vCard(of user: JID) async throws(StorageError) -> (xml: String, photoHash: String?)? {
        try await run { db in
            guard let row = try db.query(
                "SELECT xml, photo_hash FROM vcards WHERE host = ? AND username = ?", Self.userBinds(user)).first,
                  let xml = row.column("xml")?.string
            else { return nil }
            return (xml, row.column("photo_hash")?.string)
        }
    }

    public func setVCard(_ xml: String, photoHash: String?, of user: JID) async throws(StorageError) {
        try await run { db in
            try db.query(
                """
                INSERT INTO vcards (host, username, xml, photo_hash) VALUES (?, ?, ?, ?)
                ON CONFLICT (host, username) DO UPDATE SET xml = excluded.xml, photo_hash = excluded.photo_hash
                """, Self.userBinds(user) + [.text(xml), photoHash.map { .text($0) } ?? .null])
        }
    }
}

extension SQLiteStore: LastActivityStore {
    public func lastActivity(of user: JID) async throws(StorageError) -> (seconds: Int, status: String)? {
        try await run { db in
            guard let row = try db.query(
                "SELECT seconds, status FROM last_activity WHERE host = ? AND username = ?", Self.userBinds(user)).first,
                  let seconds = row.column("seconds")?.integer
            else { return nil }
            return (seconds, row.column("status")?.string ?? "")
        }
    }

    public func setLastActivity(of user: JID, at seconds: Int, status: String) async throws(StorageError) {
        try await run { db in
            try db.query(
                """
                INSERT INTO last_activity (host, username, seconds, status) VALUES (?, ?, ?, ?)
                ON CONFLICT (host, username) DO UPDATE SET seconds = excluded.seconds, status = excluded.status
                """, Self.userBinds(user) + [.integer(seconds), .text(status)])
        }
    }
}

extension SQLiteStore: StarlingStore {}
