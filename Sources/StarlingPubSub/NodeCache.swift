import StarlingAPI
import StarlingStorage
import Synchronization

/// A node as a PubSub service keeps it in memory: its configuration and newest item (what a contact coming online
/// is sent), so presence does not read the database for every contact's every node.
struct CachedNode: Sendable {
    /// Payloads larger than this are not kept in memory (an avatar's image data, say): the newest item
    /// is read from storage when it has to be sent.
    static let largestCachedPayload = 16_384

    var config: PubSubNodeConfig
    /// The newest item; its payload is empty when `lastPayloadElided`.
    private(set) var last: StoredPubSubItem?
    private(set) var lastPayloadElided = false
    /// Subscriptions by JID (as subscribed, bare or full): `subscribed` or `pending`. PEP nodes have none.
    var subscriptions: [String: String] = [:]

    init(config: PubSubNodeConfig, last: StoredPubSubItem? = nil, subscriptions: [String: String] = [:]) {
        self.config = config
        self.subscriptions = subscriptions
        setLast(last)
    }

    /// Records the newest item, keeping its payload only when it is small; a node whose items are not
    /// stored keeps every payload (there is nowhere else to read it from).
    mutating func setLast(_ item: StoredPubSubItem?) {
        guard var item, item.payload.utf8.count > Self.largestCachedPayload, config.persistItems else {
            last = item
            lastPayloadElided = false
            return
        }
        item.payload = ""
        last = item
        lastPayloadElided = true
    }
}

/// The nodes of recently used PubSub services (accounts' PEP services, or a service's domain), bounded. Each node of a cluster keeps its own; a change on
/// one node drops the owner's entry on the others.
final class NodeCache: Sendable {
    private struct State {
        var entries: [JID: [String: CachedNode]] = [:]
        /// Bumped on every change to an owner's nodes, so a load that raced with a change is not kept.
        var changes: [JID: Int] = [:]
        /// Bumped when the cache starts again (the per-owner counters go with it).
        var epoch = 0
    }

    private let state = Mutex(State())
    private let limit: Int

    init(limit: Int) { self.limit = limit }

    /// The owner's nodes, loaded through `load` on a miss.
    func nodes(of owner: JID, load: () async throws -> [String: CachedNode]) async throws -> [String: CachedNode] {
        let seen = state.withLock { state -> (cached: [String: CachedNode]?, change: Int, epoch: Int) in
            (state.entries[owner], state.changes[owner] ?? 0, state.epoch)
        }
        if let cached = seen.cached { return cached }
        let loaded = try await load()
        state.withLock { state in
            guard state.epoch == seen.epoch, (state.changes[owner] ?? 0) == seen.change else { return }
            // Crude but bounded: a full cache starts again rather than tracking recency on every read.
            if state.entries.count >= limit || state.changes.count >= limit * 4 {
                state.entries.removeAll(keepingCapacity: true)
                state.changes.removeAll(keepingCapacity: true)
                state.epoch += 1
            }
            state.entries[owner] = loaded
        }
        return loaded
    }

    /// Changes a cached owner's nodes (when the owner is not cached, the next read loads what was stored).
    func update(_ owner: JID, _ change: (inout [String: CachedNode]) -> Void) {
        state.withLock { state in
            state.changes[owner, default: 0] += 1
            guard var nodes = state.entries[owner] else { return }
            change(&nodes)
            state.entries[owner] = nodes
        }
    }

    func drop(_ owner: JID) {
        state.withLock { state in
            state.changes[owner, default: 0] += 1
            state.entries.removeValue(forKey: owner)
        }
    }
}
