import PostgresNIO
import StarlingStorage

extension PostgresStore: ClusterMembershipStore {
    public func registerNode(cluster: String, node: String, link: String, startedAt: Int64) async throws(StorageError) {
        try await run { [client, logger] in
            try await client.query("""
                INSERT INTO cluster_nodes (cluster, node, link, started_at, heartbeat) VALUES (\(cluster), \(node), \(link), \(startedAt), now())
                ON CONFLICT (cluster, node) DO UPDATE SET link = EXCLUDED.link, started_at = EXCLUDED.started_at, heartbeat = now()
                """, logger: logger)
        }
    }

    public func heartbeat(cluster: String, node: String) async throws(StorageError) {
        try await run { [client, logger] in
            try await client.query("UPDATE cluster_nodes SET heartbeat = now() WHERE cluster = \(cluster) AND node = \(node)", logger: logger)
        }
    }

    public func clusterMembers(cluster: String) async throws(StorageError) -> [ClusterMember] {
        try await run { [client, logger] in
            var members: [ClusterMember] = []
            for try await (node, link, startedAt, silence) in try await client.query(
                "SELECT node, link, started_at, EXTRACT(EPOCH FROM now() - heartbeat)::float8 FROM cluster_nodes WHERE cluster = \(cluster) ORDER BY node",
                logger: logger
            ).decode((String, String, Int64, Double).self) {
                members.append(ClusterMember(node: node, link: link, startedAt: startedAt, silence: silence))
            }
            return members
        }
    }

    public func deregisterNode(cluster: String, node: String) async throws(StorageError) {
        try await run { [client, logger] in
            try await client.query("DELETE FROM cluster_nodes WHERE cluster = \(cluster) AND node = \(node)", logger: logger)
        }
    }
}
