import Synchronization

/// Per-key state a module shares across event loops (per-account lists, per-session flags).
///
/// Keys are spread over independently locked shards, so two sessions on different loops contend only
/// when their keys land in the same shard, and no single lock sits on the stanza path. Each call holds
/// one shard's lock for the duration of `body`: keep bodies short and never call back into the server
/// from inside one.
public final class ShardedDictionary<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    private final class Shard: Sendable {
        let entries = Mutex<[Key: Value]>([:])
    }

    private let shards: [Shard]

    public init(shards: Int = 64) {
        precondition(shards > 0)
        self.shards = (0..<shards).map { _ in Shard() }
    }

    private func shard(for key: Key) -> Shard {
        shards[Int(UInt(bitPattern: key.hashValue) % UInt(shards.count))]
    }

    /// Reads or changes the value for `key` under its shard's lock; setting it to nil removes it.
    @discardableResult
    public func withValue<Result>(for key: Key, _ body: (inout Value?) throws -> Result) rethrows -> Result {
        try shard(for: key).entries.withLock { entries in
            try body(&entries[key])
        }
    }

    public subscript(key: Key) -> Value? {
        get { shard(for: key).entries.withLock { $0[key] } }
        set { shard(for: key).entries.withLock { $0[key] = newValue } }
    }

    /// Every entry, read shard by shard (not one atomic picture): for state handover and reports, not
    /// for the stanza path.
    public func snapshot() -> [Key: Value] {
        var all: [Key: Value] = [:]
        for shard in shards { all.merge(shard.entries.withLock { $0 }) { $1 } }
        return all
    }

    @discardableResult
    public func removeValue(forKey key: Key) -> Value? {
        shard(for: key).entries.withLock { $0.removeValue(forKey: key) }
    }
}
