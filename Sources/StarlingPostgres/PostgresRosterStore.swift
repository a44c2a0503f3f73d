import Foundation
import PostgresNIO
import StarlingAPI
import StarlingStorage

extension PostgresStore: RosterStore {
    public func roster(of user: JID) async throws(StorageError) -> (version: Int, items: [RosterItem]) {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            var items: [RosterItem] = []
            let rows = try await client.query(
                "SELECT contact, name, groups, subscription, ask, approved FROM roster_items WHERE host = \(host) AND username = \(username) ORDER BY contact",
                logger: logger)
            for try await row in rows.decode((String, String?, String, String, Bool, Bool).self) {
                if let item = Self.item(row) { items.append(item) }
            }
            return (try await Self.version(host: host, username: username, client: client), items)
        }
    }

    public func item(of user: JID, contact: JID) async throws(StorageError) -> RosterItem? {
        let (host, username) = Self.key(user)
        let contact = contact.description
        return try await run { [client, logger] in
            let rows = try await client.query(
                "SELECT contact, name, groups, subscription, ask, approved FROM roster_items WHERE host = \(host) AND username = \(username) AND contact = \(contact)",
                logger: logger)
            for try await row in rows.decode((String, String?, String, String, Bool, Bool).self) { return Self.item(row) }
            return nil
        }
    }

    public func put(_ item: RosterItem, for user: JID) async throws(StorageError) -> Int {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            let groups = String(decoding: try JSONEncoder().encode(item.groups), as: UTF8.self)
            return try await client.withTransaction(logger: logger) { connection in
                try await connection.query(
                    """
                    INSERT INTO roster_items (host, username, contact, name, groups, subscription, ask, approved)
                    VALUES (\(host), \(username), \(item.jid.description), \(item.name), \(groups), \(item.subscription.rawValue), \(item.askSubscribe), \(item.preApproved))
                    ON CONFLICT (host, username, contact) DO UPDATE SET name = EXCLUDED.name, groups = EXCLUDED.groups,
                        subscription = EXCLUDED.subscription, ask = EXCLUDED.ask, approved = EXCLUDED.approved
                    """, logger: logger)
                return try await Self.bump(host: host, username: username, on: connection, logger: logger)
            }
        }
    }

    public func remove(contact: JID, for user: JID) async throws(StorageError) -> Int {
        let (host, username) = Self.key(user)
        let contact = contact.description
        return try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                try await connection.query("DELETE FROM roster_items WHERE host = \(host) AND username = \(username) AND contact = \(contact)", logger: logger)
                return try await Self.bump(host: host, username: username, on: connection, logger: logger)
            }
        }
    }

    public func addPendingSubscription(from contact: JID, to user: JID, stanza: String) async throws(StorageError) {
        let (host, username) = Self.key(user)
        let contact = contact.description
        try await run { [client, logger] in
            try await client.query(
                """
                INSERT INTO roster_pending (host, username, contact, stanza) VALUES (\(host), \(username), \(contact), \(stanza))
                ON CONFLICT (host, username, contact) DO UPDATE SET stanza = EXCLUDED.stanza
                """, logger: logger)
        }
    }

    public func removePendingSubscription(from contact: JID, to user: JID) async throws(StorageError) {
        let (host, username) = Self.key(user)
        let contact = contact.description
        try await run { [client, logger] in
            try await client.query("DELETE FROM roster_pending WHERE host = \(host) AND username = \(username) AND contact = \(contact)", logger: logger)
        }
    }

    public func pendingSubscriptions(to user: JID) async throws(StorageError) -> [(contact: JID, stanza: String)] {
        let (host, username) = Self.key(user)
        let rows: [(String, String)] = try await run { [client, logger] in
            var rows: [(String, String)] = []
            for try await row in try await client.query(
                "SELECT contact, stanza FROM roster_pending WHERE host = \(host) AND username = \(username) ORDER BY contact", logger: logger
            ).decode((String, String).self) { rows.append(row) }
            return rows
        }
        return rows.compactMap { row in JID(row.0).map { ($0, row.1) } }
    }

    public func removeAll(of user: JID) async throws(StorageError) {
        let (host, username) = Self.key(user)
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                for table in ["roster_items", "roster_pending", "roster_versions"] {
                    try await connection.query(PostgresQuery(unsafeSQL: "DELETE FROM \(table) WHERE host = $1 AND username = $2", binds: Self.binds(host, username)), logger: logger)
                }
            }
        }
    }

    static func key(_ user: JID) -> (String, String) { (user.domainpart, user.localpart ?? "") }

    private static func version(host: String, username: String, client: PostgresClient) async throws -> Int {
        for try await version in try await client.query("SELECT version FROM roster_versions WHERE host = \(host) AND username = \(username)").decode(Int.self) {
            return version
        }
        return 0
    }

    private static func bump(host: String, username: String, on connection: PostgresConnection, logger: Logger) async throws -> Int {
        let rows = try await connection.query(
            """
            INSERT INTO roster_versions (host, username, version) VALUES (\(host), \(username), 1)
            ON CONFLICT (host, username) DO UPDATE SET version = roster_versions.version + 1
            RETURNING version
            """, logger: logger)
        for try await version in rows.decode(Int.self) { return version }
        return 0
    }

    private static func item(_ row: (String, String?, String, String, Bool, Bool)) -> RosterItem? {
        guard let jid = JID(row.0), let subscription = Subscription(rawValue: row.3) else { return nil }
        let groups = (try? JSONDecoder().decode([String].self, from: Data(row.2.utf8))) ?? []
        return RosterItem(jid: jid, name: row.1, groups: groups, subscription: subscription, askSubscribe: row.4, preApproved: row.5)
    }
}
