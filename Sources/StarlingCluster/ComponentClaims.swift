/// Which node of a cluster serves each component domain, and the rule when two nodes claim one: the
/// earlier claim wins, then the smaller node name. A plain state machine; the router keeps it under a
/// lock and carries out what it returns.
public struct ComponentClaims: Sendable {
    public struct Claim: Sendable, Equatable {
        public var node: String
        /// Microseconds since the epoch.
        public var claimedAt: UInt64

        public init(node: String, claimedAt: UInt64) {
            self.node = node
            self.claimedAt = claimedAt
        }

        public func precedes(_ other: Claim) -> Bool { (claimedAt, node) < (other.claimedAt, other.node) }
    }

    /// What applying another node's claim means here.
    public enum Outcome: Sendable, Equatable {
        /// It stands; `releasedHere`: this node served the domain until now and must let go.
        case accepted(releasedHere: Bool)
        /// An earlier claim stands; `insist`: it is this node's, to be repeated to the claimant.
        case refused(insist: Claim?)
    }

    public let node: String
    public private(set) var table: [String: Claim] = [:]

    public init(node: String) { self.node = node }

    /// The domain's claim, this node's if nobody had one (`new` says so: announce it).
    public mutating func claim(_ domain: String, at time: UInt64) -> (claim: Claim, new: Bool) {
        if let existing = table[domain] { return (existing, false) }
        let claim = Claim(node: node, claimedAt: time)
        table[domain] = claim
        return (claim, true)
    }

    public mutating func apply(_ domain: String, _ incoming: Claim) -> Outcome {
        if let current = table[domain], current.node != incoming.node, !incoming.precedes(current) {
            return .refused(insist: current.node == node ? current : nil)
        }
        let releasedHere = table[domain]?.node == node && incoming.node != node
        table[domain] = incoming
        return .accepted(releasedHere: releasedHere)
    }

    /// Forgets what `node` served (it was lost, or its snapshot follows).
    public mutating func drop(node lost: String) {
        table = table.filter { $0.value.node != lost }
    }

    /// The domains this node serves.
    public var local: [(domain: String, claimedAt: UInt64)] {
        table.filter { $0.value.node == node }.map { ($0.key, $0.value.claimedAt) }
    }
}
