import Metrics
import Synchronization

/// Durations and failures of storage operations, by backend, store and operation, through swift-metrics:
/// `starling_storage_operation_duration_seconds` and `starling_storage_errors_total`, once the server turns
/// them on (it does when it serves metrics).
public enum StorageMetrics {
    private struct Meters: Sendable {
        let duration: Metrics.Timer
        let errors: Metrics.Counter
    }

    /// Made once per (backend, store, operation); the lock is taken once per operation, which waits on a
    /// database anyway.
    private static let meters = Mutex<[String: Meters]>([:])

    private static let enabledFlag = Atomic<Bool>(false)

    /// Set once the server serves metrics: until then operations run unmeasured (no clock, no lock).
    public static var enabled: Bool {
        get { enabledFlag.load(ordering: .acquiring) }
        set { enabledFlag.store(newValue, ordering: .releasing) }
    }

    /// Runs `body`, timing it and counting its failure.
    /// - Parameters:
    ///   - file: the backend file the operation is written in (`#fileID`), which names its store.
    ///   - function: the store method (`#function`), whose name up to `(` is the operation.
    public static func measure<T>(backend: String, file: String, function: String,
                                  _ body: () async throws(StorageError) -> T) async throws(StorageError) -> T {
        guard enabled else { return try await body() }
        let meters = self.meters(backend: backend, file: file, function: function)
        let start = ContinuousClock.now
        do {
            let value = try await body()
            meters.duration.record(duration: .now - start)
            return value
        } catch {
            meters.errors.increment()
            throw error
        }
    }

    private static func meters(backend: String, file: String, function: String) -> Meters {
        let key = backend + "\u{0}" + file + "\u{0}" + function
        return meters.withLock { meters in
            if let existing = meters[key] { return existing }
            let dimensions = [("backend", backend), ("store", store(file: file, backend: backend)), ("operation", String(function.prefix { $0 != "(" }))]
            let made = Meters(duration: Metrics.Timer(label: "starling_storage_operation_duration_seconds", dimensions: dimensions),
                              errors: Metrics.Counter(label: "starling_storage_errors_total", dimensions: dimensions))
            meters[key] = made
            return made
        }
    }

    /// `StarlingSQLite/SQLiteRosterStore.swift` → `roster`; `…FeatureStores.swift` → `features`.
    static func store(file: String, backend: String) -> String {
        var name = Substring(file.split(separator: "/").last ?? Substring(file))
        if name.hasSuffix(".swift") { name = name.dropLast(6) }
        for prefix in ["SQLite", "Postgres"] where name.hasPrefix(prefix) { name = name.dropFirst(prefix.count) }
        for suffix in ["Stores", "Store"] where name.hasSuffix(suffix) {
            name = name.dropLast(suffix.count)
            if suffix == "Stores" { return name.lowercased() + "s" }
        }
        return name.isEmpty ? "store" : name.lowercased()
    }
}
