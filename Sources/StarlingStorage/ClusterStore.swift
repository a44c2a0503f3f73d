/// One node of a cluster as the membership registry records it.
public struct ClusterMember: Sendable, Equatable {
    public var node: String
    /// Where its node link listens, `host:port`.
    public var link: String
    /// Seconds since the Unix epoch, by the node's clock.
    public var startedAt: Int64
    /// Seconds since its last heartbeat, by the database's clock (so nodes' clocks need not agree).
    public var silence: Double

    public init(node: String, link: String, startedAt: Int64, silence: Double) {
        self.node = node
        self.link = link
        self.startedAt = startedAt
        self.silence = silence
    }
}

/// The membership registry of clusters: nodes that share a database and a cluster name register, beat
/// and read each other here. Only PostgreSQL provides it (a cluster needs a database all nodes reach).
public protocol ClusterMembershipStore: Sendable {
    /// Registers `node` (again, after a restart: the row is replaced) with a fresh heartbeat.
    func registerNode(cluster: String, node: String, link: String, startedAt: Int64) async throws(StorageError)
    func heartbeat(cluster: String, node: String) async throws(StorageError)
    /// Every registered node of `cluster`, the silent ones too.
    func clusterMembers(cluster: String) async throws(StorageError) -> [ClusterMember]
    func deregisterNode(cluster: String, node: String) async throws(StorageError)
}
