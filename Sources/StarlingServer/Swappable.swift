import NIOConcurrencyHelpers
import NIOPosix
import Synchronization

/// A reference read on every stanza and replaced rarely (module tables on `reload-module`).
///
/// Readers compare one atomic version number with the copy cached for their thread and take a lock only
/// after a replacement, so the stanza path takes no lock and writes no shared memory.
final class Swappable<Value: AnyObject & Sendable>: @unchecked Sendable {
    private final class Cached: @unchecked Sendable {
        let version: Int
        let value: Value
        init(version: Int, value: Value) {
            self.version = version
            self.value = value
        }
    }

    private let latest: NIOLockedValueBox<Cached>
    private let version = Atomic<Int>(0)
    private let perThread = ThreadSpecificVariable<Cached>()

    init(_ value: Value) {
        latest = NIOLockedValueBox(Cached(version: 0, value: value))
    }

    var current: Value {
        if let cached = perThread.currentValue, cached.version == version.load(ordering: .acquiring) { return cached.value }
        let cached = latest.withLockedValue { $0 }
        perThread.currentValue = cached
        return cached.value
    }

    /// Readers see `value` from their next read on.
    func replace(_ value: Value) {
        latest.withLockedValue { latest in
            latest = Cached(version: latest.version + 1, value: value)
            version.store(latest.version, ordering: .releasing)
        }
    }
}
