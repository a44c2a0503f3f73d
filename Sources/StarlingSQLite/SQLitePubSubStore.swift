import SQLiteNIO
import StarlingAPI
import StarlingStorage

extension SQLiteStore: PubSubStore {
    public func pubsubNodes(of service: JID) async throws(StorageError) -> [StoredPubSubNode] {
        let rows = try await run { db in
            try db.query("SELECT node, config FROM pubsub_nodes WHERE host = ? AND username = ? ORDER BY node", Self.userBinds(service))
        }
        var nodes: [StoredPubSubNode] = []
        for row in rows {
            guard let name = row.column("node")?.string else { continue }
            nodes.append(StoredPubSubNode(service: service, name: name, config: try PubSubNodeConfig.decode(row.column("config")?.string ?? "{}", node: name)))
        }
        return nodes
    }

    public func savePubSubNode(_ node: StoredPubSubNode) async throws(StorageError) {
        try await run { db in
            try db.query(
                """
                INSERT INTO pubsub_nodes (host, username, node, config) VALUES (?, ?, ?, ?)
                ON CONFLICT (host, username, node) DO UPDATE SET config = excluded.config
                """, Self.userBinds(node.service) + [.text(node.name), .text(node.config.encoded())])
        }
    }

    public func deletePubSubNode(_ name: String, of service: JID) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                let binds = Self.userBinds(service) + [.text(name)]
                try db.query("DELETE FROM pubsub_items WHERE host = ? AND username = ? AND node = ?", binds)
                try db.query("DELETE FROM pubsub_subscriptions WHERE host = ? AND username = ? AND node = ?", binds)
                try db.query("DELETE FROM pubsub_nodes WHERE host = ? AND username = ? AND node = ?", binds)
            }
        }
    }

    public func pubsubItems(of node: String, service: JID, ids: [String]?, limit: Int?) async throws(StorageError) -> [StoredPubSubItem] {
        var sql = "SELECT item_id, publisher, payload, published FROM pubsub_items WHERE host = ? AND username = ? AND node = ?"
        var binds = Self.userBinds(service) + [.text(node)]
        if let ids {
            guard !ids.isEmpty else { return [] }
            sql += " AND item_id IN (" + ids.map { _ in "?" }.joined(separator: ", ") + ")"
            binds += ids.map { .text($0) }
        }
        sql += " ORDER BY seq DESC"
        if let limit {
            sql += " LIMIT ?"
            binds.append(.integer(max(0, limit)))
        }
        return try await run { [sql, binds] db in
            try db.query(sql, binds).compactMap { row in
                guard let id = row.column("item_id")?.string else { return nil }
                return StoredPubSubItem(id: id, publisher: row.column("publisher")?.string ?? "", payload: row.column("payload")?.string ?? "",
                                        published: row.column("published")?.integer ?? 0)
            }
        }
    }

    public func publishPubSubItem(_ item: StoredPubSubItem, to node: String, service: JID, keep: Int) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                let binds = Self.userBinds(service) + [.text(node)]
                // Deleted and inserted again: a republished id becomes the newest.
                try db.query("DELETE FROM pubsub_items WHERE host = ? AND username = ? AND node = ? AND item_id = ?",
                                                    binds + [.text(item.id)])
                try db.query(
                    "INSERT INTO pubsub_items (host, username, node, item_id, publisher, payload, published) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    binds + [.text(item.id), .text(item.publisher), .text(item.payload), .integer(item.published)])
                try db.query(
                    """
                    DELETE FROM pubsub_items WHERE host = ? AND username = ? AND node = ? AND seq NOT IN (
                        SELECT seq FROM pubsub_items WHERE host = ? AND username = ? AND node = ? ORDER BY seq DESC LIMIT ?)
                    """, binds + binds + [.integer(max(1, keep))])
            }
        }
    }

    public func retractPubSubItem(_ id: String, from node: String, service: JID) async throws(StorageError) -> Bool {
        try await run { db in
            let rows = try db.query(
                "DELETE FROM pubsub_items WHERE host = ? AND username = ? AND node = ? AND item_id = ? RETURNING seq",
                Self.userBinds(service) + [.text(node), .text(id)])
            return !rows.isEmpty
        }
    }

    public func purgePubSubNode(_ name: String, of service: JID) async throws(StorageError) {
        try await run { db in
            try db.query("DELETE FROM pubsub_items WHERE host = ? AND username = ? AND node = ?", Self.userBinds(service) + [.text(name)])
        }
    }

    public func pubsubSubscriptions(of service: JID) async throws(StorageError) -> [String: [StoredPubSubSubscription]] {
        let rows = try await run { db in
            try db.query("SELECT node, jid, state FROM pubsub_subscriptions WHERE host = ? AND username = ? ORDER BY node, jid",
                                            Self.userBinds(service))
        }
        var subscriptions: [String: [StoredPubSubSubscription]] = [:]
        for row in rows {
            guard let node = row.column("node")?.string, let jid = row.column("jid")?.string, let state = row.column("state")?.string else { continue }
            subscriptions[node, default: []].append(StoredPubSubSubscription(jid: jid, state: state))
        }
        return subscriptions
    }

    public func setPubSubSubscription(_ jid: String, state: String?, node: String, service: JID) async throws(StorageError) {
        try await run { db in
            let binds = Self.userBinds(service) + [.text(node), .text(jid)]
            if let state {
                try db.query(
                    """
                    INSERT INTO pubsub_subscriptions (host, username, node, jid, state) VALUES (?, ?, ?, ?, ?)
                    ON CONFLICT (host, username, node, jid) DO UPDATE SET state = excluded.state
                    """, binds + [.text(state)])
            } else {
                try db.query("DELETE FROM pubsub_subscriptions WHERE host = ? AND username = ? AND node = ? AND jid = ?", binds)
            }
        }
    }
}
