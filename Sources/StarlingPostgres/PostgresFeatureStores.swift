import Foundation
import PostgresNIO
import StarlingAPI
import StarlingStorage

extension PostgresStore: OfflineStore {
    public func storeOffline(_ stanza: String, for user: JID, limit: Int) async throws(StorageError) -> Bool {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                // Serialize concurrent stores for one account so the quota holds.
                try await connection.query("SELECT pg_advisory_xact_lock(hashtext(\(host + "/" + username)))", logger: logger)
                var count = 0
                for try await n in try await connection.query(
                    "SELECT COUNT(*)::BIGINT FROM offline_messages WHERE host = \(host) AND username = \(username)", logger: logger).decode(Int.self) { count = n }
                guard count < limit else { return false }
                try await connection.query(
                    "INSERT INTO offline_messages (host, username, stanza, stored_at) VALUES (\(host), \(username), \(stanza), \(Int(Date().timeIntervalSince1970)))",
                    logger: logger)
                return true
            }
        }
    }

    public func takeOffline(for user: JID) async throws(StorageError) -> [String] {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            var stanzas: [(Int, String)] = []
            for try await row in try await client.query(
                "DELETE FROM offline_messages WHERE host = \(host) AND username = \(username) RETURNING id, stanza", logger: logger
            ).decode((Int, String).self) { stanzas.append(row) }
            return stanzas.sorted { $0.0 < $1.0 }.map(\.1)
        }
    }

    public func offlineMessages(for user: JID) async throws(StorageError) -> [String] {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            var stanzas: [String] = []
            for try await stanza in try await client.query(
                "SELECT stanza FROM offline_messages WHERE host = \(host) AND username = \(username) ORDER BY id", logger: logger
            ).decode(String.self) { stanzas.append(stanza) }
            return stanzas
        }
    }

    public func offlineCount(for user: JID) async throws(StorageError) -> Int {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            for try await n in try await client.query(
                "SELECT COUNT(*)::BIGINT FROM offline_messages WHERE host = \(host) AND username = \(username)", logger: logger).decode(Int.self) { return n }
            return 0
        }
    }
}

extension PostgresStore: BlocklistStore {
    public func blocklist(of user: JID) async throws(StorageError) -> [JID] {
        let (host, username) = Self.key(user)
        let items: [String] = try await run { [client, logger] in
            var items: [String] = []
            for try await item in try await client.query(
                "SELECT item FROM blocklist WHERE host = \(host) AND username = \(username) ORDER BY item", logger: logger).decode(String.self) { items.append(item) }
            return items
        }
        return items.compactMap(JID.init)
    }

    public func block(_ items: [JID], for user: JID) async throws(StorageError) {
        let (host, username) = Self.key(user)
        let texts = items.map(\.description)
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                for item in texts {
                    try await connection.query("INSERT INTO blocklist (host, username, item) VALUES (\(host), \(username), \(item)) ON CONFLICT DO NOTHING", logger: logger)
                }
            }
        }
    }

    public func unblock(_ items: [JID], for user: JID) async throws(StorageError) {
        let (host, username) = Self.key(user)
        let texts = items.map(\.description)
        try await run { [client, logger] in
            if texts.isEmpty {
                try await client.query("DELETE FROM blocklist WHERE host = \(host) AND username = \(username)", logger: logger)
            } else {
                try await client.query("DELETE FROM blocklist WHERE host = \(host) AND username = \(username) AND item = ANY(\(texts))", logger: logger)
            }
        }
    }
}

extension PostgresStore: PrivateXMLStore {
    public func privateXML(of user: JID, name: String, namespace: String) async throws(StorageError) -> String? {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            for try await xml in try await client.query(
                "SELECT xml FROM private_xml WHERE host = \(host) AND username = \(username) AND name = \(name) AND namespace = \(namespace)",
                logger: logger).decode(String.self) { return xml }
            return nil
        }
    }

    public func allPrivateXML(of user: JID) async throws(StorageError) -> [String] {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            var documents: [String] = []
            for try await xml in try await client.query(
                "SELECT xml FROM private_xml WHERE host = \(host) AND username = \(username) ORDER BY namespace, name", logger: logger
            ).decode(String.self) { documents.append(xml) }
            return documents
        }
    }

    public func setPrivateXML(_ xml: String, of user: JID, name: String, namespace: String) async throws(StorageError) {
        let (host, username) = Self.key(user)
        try await run { [client, logger] in
            try await client.query(
                """
                INSERT INTO private_xml (host, username, name, namespace, xml) VALUES (\(host), \(username), \(name), \(namespace), \(xml))
                ON CONFLICT (host, username, name, namespace) DO UPDATE SET xml = EXCLUDED.xml
                """, logger: logger)
        }
    }
}

extension PostgresStore: VCardStore {
    public func vCard(of user: JID) async throws(StorageError) -> (xml: String, photoHash: String?)? {
        let (host, username) = Self.key(user)
        let row: (String, String?)? = try await run { [client, logger] in
            for try await row in try await client.query(
                "SELECT xml, photo_hash FROM vcards WHERE host = \(host) AND username = \(username)", logger: logger).decode((String, String?).self) { return row }
            return nil
        }
        return row.map { ($0.0, $0.1) }
    }

    public func setVCard(_ xml: String, photoHash: String?, of user: JID) async throws(StorageError) {
        let (host, username) = Self.key(user)
        try await run { [client, logger] in
            try await client.query(
                """
                INSERT INTO vcards (host, username, xml, photo_hash) VALUES (\(host), \(username), \(xml), \(photoHash))
                ON CONFLICT (host, username) DO UPDATE SET xml = EXCLUDED.xml, photo_hash = EXCLUDED.photo_hash
                """, logger: logger)
        }
    }
}

extension PostgresStore: LastActivityStore {
    public func lastActivity(of user: JID) async throws(StorageError) -> (seconds: Int, status: String)? {
        let (host, username) = Self.key(user)
        let row: (Int, String)? = try await run { [client, logger] in
            for try await row in try await client.query(
                "SELECT seconds, status FROM last_activity WHERE host = \(host) AND username = \(username)", logger: logger).decode((Int, String).self) { return row }
            return nil
        }
        return row.map { (seconds: $0.0, status: $0.1) }
    }

    public func setLastActivity(of user: JID, at seconds: Int, status: String) async throws(StorageError) {
        let (host, username) = Self.key(user)
        try await run { [client, logger] in
            try await client.query(
                """
                INSERT INTO last_activity (host, username, seconds, status) VALUES (\(host), \(username), \(seconds), \(status))
                ON CONFLICT (host, username) DO UPDATE SET seconds = EXCLUDED.seconds, status = EXCLUDED.status
                """, logger: logger)
        }
    }
}

extension PostgresStore: StarlingStore {}
