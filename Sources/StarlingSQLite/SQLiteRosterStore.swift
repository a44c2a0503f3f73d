import Foundation
import SQLiteNIO
import StarlingAPI
import StarlingStorage

extension SQLiteStore: RosterStore {
    public func roster(of user: JID) async throws(StorageError) -> (version: Int, items: [RosterItem]) {
        try await run { db in
            let rows = try db.query(
                "SELECT contact, name, groups, subscription, ask, approved FROM roster_items WHERE host = ? AND username = ? ORDER BY contact",
                Self.userBinds(user))
            return (try Self.rosterVersion(db, of: user), rows.compactMap(Self.item(from:)))
        }
    }

    public func item(of user: JID, contact: JID) async throws(StorageError) -> RosterItem? {
        try await run { db in
            try db.query(
                "SELECT contact, name, groups, subscription, ask, approved FROM roster_items WHERE host = ? AND username = ? AND contact = ?",
                Self.userBinds(user) + [.text(contact.description)]
            ).first.flatMap(Self.item(from:))
        }
    }

    public func put(_ item: RosterItem, for user: JID) async throws(StorageError) -> Int {
        try await run { db in
            try db.transaction {
                let groups = String(decoding: try JSONEncoder().encode(item.groups), as: UTF8.self)
                try db.query(
                    """
                    INSERT INTO roster_items (host, username, contact, name, groups, subscription, ask, approved)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (host, username, contact) DO UPDATE SET
                        name = excluded.name, groups = excluded.groups, subscription = excluded.subscription,
                        ask = excluded.ask, approved = excluded.approved
                    """,
                    Self.userBinds(user) + [.text(item.jid.description), item.name.map { .text($0) } ?? .null, .text(groups),
                                            .text(item.subscription.rawValue), .integer(item.askSubscribe ? 1 : 0), .integer(item.preApproved ? 1 : 0)])
                return try Self.bumpRosterVersion(db, of: user)
            }
        }
    }

    public func remove(contact: JID, for user: JID) async throws(StorageError) -> Int {
        try await run { db in
            try db.transaction {
                try db.query(
                    "DELETE FROM roster_items WHERE host = ? AND username = ? AND contact = ?",
                    Self.userBinds(user) + [.text(contact.description)])
                return try Self.bumpRosterVersion(db, of: user)
            }
        }
    }

    public func addPendingSubscription(from contact: JID, to user: JID, stanza: String) async throws(StorageError) {
        try await run { db in
            try db.query(
                """
                INSERT INTO roster_pending (host, username, contact, stanza) VALUES (?, ?, ?, ?)
                ON CONFLICT (host, username, contact) DO UPDATE SET stanza = excluded.stanza
                """,
                Self.userBinds(user) + [.text(contact.description), .text(stanza)])
        }
    }

    public func removePendingSubscription(from contact: JID, to user: JID) async throws(StorageError) {
        try await run { db in
            try db.query(
                "DELETE FROM roster_pending WHERE host = ? AND username = ? AND contact = ?",
                Self.userBinds(user) + [.text(contact.description)])
        }
    }

    public func pendingSubscriptions(to user: JID) async throws(StorageError) -> [(contact: JID, stanza: String)] {
        try await run { db in
            try db.query(
                "SELECT contact, stanza FROM roster_pending WHERE host = ? AND username = ? ORDER BY contact", Self.userBinds(user)
            ).compactMap { row in
                guard let contact = row.column("contact")?.string.flatMap(JID.init), let stanza = row.column("stanza")?.string else { return nil }
                return (contact, stanza)
            }
        }
    }

    public func removeAll(of user: JID) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                for table in ["roster_items", "roster_pending", "roster_versions"] {
                    try db.query("DELETE FROM \(table) WHERE host = ? AND username = ?", Self.userBinds(user))
                }
            }
        }
    }

    static func userBinds(_ user: JID) -> [SQLiteData] {
        [.text(user.domainpart), .text(user.localpart ?? "")]
    }

    private static func rosterVersion(_ db: SQLiteHandle, of user: JID) throws -> Int {
        try db.query("SELECT version FROM roster_versions WHERE host = ? AND username = ?", Self.userBinds(user))
            .first?.column("version")?.integer ?? 0
    }

    private static func bumpRosterVersion(_ db: SQLiteHandle, of user: JID) throws -> Int {
        try db.query(
            """
            INSERT INTO roster_versions (host, username, version) VALUES (?, ?, 1)
            ON CONFLICT (host, username) DO UPDATE SET version = version + 1
            """, Self.userBinds(user))
        return try rosterVersion(db, of: user)
    }

    private static func item(from row: SQLiteResultRow) -> RosterItem? {
        guard let jid = row.column("contact")?.string.flatMap(JID.init),
              let subscription = row.column("subscription")?.string.flatMap(Subscription.init(rawValue:))
        else { return nil }
        let groups = row.column("groups")?.string.flatMap { try? JSONDecoder().decode([String].self, from: Data($0.utf8)) } ?? []
        return RosterItem(jid: jid, name: row.column("name")?.string, groups: groups, subscription: subscription,
                          askSubscribe: row.column("ask")?.integer == 1, preApproved: row.column("approved")?.integer == 1)
    }
}
