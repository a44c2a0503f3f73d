import Synchronization

/// Runs async work one item at a time per key, in submission order: two presence stanzas of one user
/// never interleave their read-modify-write of the roster, two changes to one room are stored in order,
/// while different keys run in parallel.
public final class KeyedSerialQueue: Sendable {
    private let tails = Mutex<[JID: (id: Int, task: Task<Void, Never>)]>([:])
    private let counter = Atomic<Int>(0)
    private let waiting = Atomic<Int>(0)

    public init() {}

    /// Work items submitted and not finished yet, over every key: the queue's depth, for status counters.
    public var pending: Int { waiting.load(ordering: .relaxed) }

    public func enqueue(_ key: JID, _ work: @escaping @Sendable () async -> Void) {
        let id = counter.add(1, ordering: .relaxed).newValue
        waiting.add(1, ordering: .relaxed)
        tails.withLock { tails in
            let previous = tails[key]?.task
            let task = Task {
                await previous?.value
                await work()
                self.waiting.subtract(1, ordering: .relaxed)
                self.finished(key, id: id)
            }
            tails[key] = (id, task)
        }
    }

    private func finished(_ key: JID, id: Int) {
        tails.withLock { tails in
            if tails[key]?.id == id { tails[key] = nil }
        }
    }
}
