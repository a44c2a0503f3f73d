import PostgresNIO
import StarlingAPI
import StarlingStorage

extension PostgresStore: PubSubStore {
    public func pubsubNodes(of service: JID) async throws(StorageError) -> [StoredPubSubNode] {
        let (host, username) = Self.key(service)
        let rows = try await run { [client, logger] in
            var rows: [(String, String)] = []
            for try await row in try await client.query(
                "SELECT node, config FROM pubsub_nodes WHERE host = \(host) AND username = \(username) ORDER BY node", logger: logger
            ).decode((String, String).self) { rows.append(row) }
            return rows
        }
        var nodes: [StoredPubSubNode] = []
        for (name, config) in rows {
            nodes.append(StoredPubSubNode(service: service, name: name, config: try PubSubNodeConfig.decode(config, node: name)))
        }
        return nodes
    }

    public func savePubSubNode(_ node: StoredPubSubNode) async throws(StorageError) {
        let (host, username) = Self.key(node.service)
        let (name, config) = (node.name, node.config.encoded())
        try await run { [client, logger] in
            try await client.query(
                """
                INSERT INTO pubsub_nodes (host, username, node, config) VALUES (\(host), \(username), \(name), \(config))
                ON CONFLICT (host, username, node) DO UPDATE SET config = EXCLUDED.config
                """, logger: logger)
        }
    }

    public func deletePubSubNode(_ name: String, of service: JID) async throws(StorageError) {
        let (host, username) = Self.key(service)
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                try await connection.query("DELETE FROM pubsub_items WHERE host = \(host) AND username = \(username) AND node = \(name)", logger: logger)
                try await connection.query("DELETE FROM pubsub_subscriptions WHERE host = \(host) AND username = \(username) AND node = \(name)", logger: logger)
                try await connection.query("DELETE FROM pubsub_nodes WHERE host = \(host) AND username = \(username) AND node = \(name)", logger: logger)
            }
        }
    }

    public func pubsubItems(of node: String, service: JID, ids: [String]?, limit: Int?) async throws(StorageError) -> [StoredPubSubItem] {
        let (host, username) = Self.key(service)
        if let ids, ids.isEmpty { return [] }
        // NULL binds switch a filter off; the array form keeps one statement for any number of ids.
        let limitBind = limit.map { max(0, $0) }
        let rows = try await run { [client, logger] in
            var rows: [(String, String, String, Int)] = []
            for try await row in try await client.query(
                """
                SELECT item_id, publisher, payload, published FROM pubsub_items
                WHERE host = \(host) AND username = \(username) AND node = \(node)
                  AND (\(ids)::text[] IS NULL OR item_id = ANY(\(ids)::text[]))
                ORDER BY seq DESC LIMIT \(limitBind)
                """, logger: logger
            ).decode((String, String, String, Int).self) { rows.append(row) }
            return rows
        }
        return rows.map { StoredPubSubItem(id: $0.0, publisher: $0.1, payload: $0.2, published: $0.3) }
    }

    public func publishPubSubItem(_ item: StoredPubSubItem, to node: String, service: JID, keep: Int) async throws(StorageError) {
        let (host, username) = Self.key(service)
        let keep = max(1, keep)
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                // Deleted and inserted again: a republished id becomes the newest.
                try await connection.query(
                    "DELETE FROM pubsub_items WHERE host = \(host) AND username = \(username) AND node = \(node) AND item_id = \(item.id)", logger: logger)
                try await connection.query(
                    """
                    INSERT INTO pubsub_items (host, username, node, item_id, publisher, payload, published)
                    VALUES (\(host), \(username), \(node), \(item.id), \(item.publisher), \(item.payload), \(item.published))
                    """, logger: logger)
                try await connection.query(
                    """
                    DELETE FROM pubsub_items WHERE host = \(host) AND username = \(username) AND node = \(node) AND seq NOT IN (
                        SELECT seq FROM pubsub_items WHERE host = \(host) AND username = \(username) AND node = \(node) ORDER BY seq DESC LIMIT \(keep))
                    """, logger: logger)
            }
        }
    }

    public func retractPubSubItem(_ id: String, from node: String, service: JID) async throws(StorageError) -> Bool {
        let (host, username) = Self.key(service)
        return try await run { [client, logger] in
            let rows = try await client.query(
                "DELETE FROM pubsub_items WHERE host = \(host) AND username = \(username) AND node = \(node) AND item_id = \(id) RETURNING seq", logger: logger
            ).collect()
            return !rows.isEmpty
        }
    }

    public func purgePubSubNode(_ name: String, of service: JID) async throws(StorageError) {
        let (host, username) = Self.key(service)
        try await run { [client, logger] in
            try await client.query("DELETE FROM pubsub_items WHERE host = \(host) AND username = \(username) AND node = \(name)", logger: logger)
        }
    }

    public func pubsubSubscriptions(of service: JID) async throws(StorageError) -> [String: [StoredPubSubSubscription]] {
        let (host, username) = Self.key(service)
        let rows = try await run { [client, logger] in
            var rows: [(String, String, String)] = []
            for try await row in try await client.query(
                "SELECT node, jid, state FROM pubsub_subscriptions WHERE host = \(host) AND username = \(username) ORDER BY node, jid", logger: logger
            ).decode((String, String, String).self) { rows.append(row) }
            return rows
        }
        var subscriptions: [String: [StoredPubSubSubscription]] = [:]
        for (node, jid, state) in rows { subscriptions[node, default: []].append(StoredPubSubSubscription(jid: jid, state: state)) }
        return subscriptions
    }

    public func setPubSubSubscription(_ jid: String, state: String?, node: String, service: JID) async throws(StorageError) {
        let (host, username) = Self.key(service)
        try await run { [client, logger] in
            if let state {
                try await client.query(
                    """
                    INSERT INTO pubsub_subscriptions (host, username, node, jid, state) VALUES (\(host), \(username), \(node), \(jid), \(state))
                    ON CONFLICT (host, username, node, jid) DO UPDATE SET state = EXCLUDED.state
                    """, logger: logger)
            } else {
                try await client.query(
                    "DELETE FROM pubsub_subscriptions WHERE host = \(host) AND username = \(username) AND node = \(node) AND jid = \(jid)", logger: logger)
            }
        }
    }
}
