@_exported import StarlingStorage
import Logging
import NIOPosix
import SQLiteNIO
import Synchronization

/// The embedded database: one SQLite file in WAL mode, on one connection that the store's own thread
/// runs: each operation is one hop to that thread (so no event loop ever waits on disk), runs all its
/// statements there, each prepared once, and no statement lands inside another operation's
/// transaction. Versioned migrations run at open.
public final class SQLiteStore: Sendable {
    /// One thread: operations run one after another, in the order they were asked for.
    private let thread: NIOThreadPool
    /// Used only on `thread`, one operation at a time.
    private nonisolated(unsafe) let handle = SQLiteHandle()
    private let activity = Mutex(Activity())

    /// Each entry is one schema version; append, never edit.
    static let migrations: [[String]] = [
        [
            """
            CREATE TABLE accounts (
                host TEXT NOT NULL,
                username TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                PRIMARY KEY (host, username)
            )
            """,
            """
            CREATE TABLE scram_credentials (
                host TEXT NOT NULL,
                username TEXT NOT NULL,
                hash TEXT NOT NULL,
                salt BLOB NOT NULL,
                iterations INTEGER NOT NULL,
                stored_key BLOB NOT NULL,
                server_key BLOB NOT NULL,
                PRIMARY KEY (host, username, hash),
                FOREIGN KEY (host, username) REFERENCES accounts (host, username) ON DELETE CASCADE
            )
            """,
        ],
        [
            """
            CREATE TABLE roster_items (
                host TEXT NOT NULL,
                username TEXT NOT NULL,
                contact TEXT NOT NULL,
                name TEXT,
                groups TEXT NOT NULL,
                subscription TEXT NOT NULL,
                ask INTEGER NOT NULL,
                approved INTEGER NOT NULL,
                PRIMARY KEY (host, username, contact)
            )
            """,
            """
            CREATE TABLE roster_versions (
                host TEXT NOT NULL,
                username TEXT NOT NULL,
                version INTEGER NOT NULL,
                PRIMARY KEY (host, username)
            )
            """,
            """
            CREATE TABLE roster_pending (
                host TEXT NOT NULL,
                username TEXT NOT NULL,
                contact TEXT NOT NULL,
                stanza TEXT NOT NULL,
                PRIMARY KEY (host, username, contact)
            )
            """,
        ],
        [
            """
            CREATE TABLE offline_messages (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                host TEXT NOT NULL,
                username TEXT NOT NULL,
                stanza TEXT NOT NULL,
                stored_at INTEGER NOT NULL
            )
            """,
            "CREATE INDEX offline_messages_user ON offline_messages (host, username, id)",
            "CREATE TABLE blocklist (host TEXT NOT NULL, username TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (host, username, item))",
            """
            CREATE TABLE private_xml (
                host TEXT NOT NULL, username TEXT NOT NULL, name TEXT NOT NULL, namespace TEXT NOT NULL, xml TEXT NOT NULL,
                PRIMARY KEY (host, username, name, namespace)
            )
            """,
            "CREATE TABLE vcards (host TEXT NOT NULL, username TEXT NOT NULL, xml TEXT NOT NULL, photo_hash TEXT, PRIMARY KEY (host, username))",
            "CREATE TABLE last_activity (host TEXT NOT NULL, username TEXT NOT NULL, seconds INTEGER NOT NULL, status TEXT NOT NULL, PRIMARY KEY (host, username))",
        ],
        [
            """
            CREATE TABLE muc_rooms (
                service TEXT NOT NULL, name TEXT NOT NULL, options TEXT NOT NULL, subject TEXT NOT NULL, subject_nick TEXT,
                subject_time INTEGER, salt TEXT NOT NULL,
                PRIMARY KEY (service, name)
            )
            """,
            """
            CREATE TABLE muc_affiliations (
                service TEXT NOT NULL, name TEXT NOT NULL, jid TEXT NOT NULL, affiliation TEXT NOT NULL, nick TEXT, reason TEXT,
                PRIMARY KEY (service, name, jid)
            )
            """,
        ],
        [
            // An archive is named by (host, username): an account's, or a room's (service, room name).
            // A message's id is (stamp, random): the stamp is time-ordered, so time filters are ranges
            // on the primary key and retention a range on (host, stamp).
            """
            CREATE TABLE archive_messages (
                host TEXT NOT NULL, username TEXT NOT NULL, stamp INTEGER NOT NULL, random INTEGER NOT NULL,
                peer TEXT NOT NULL, peer_resource TEXT NOT NULL, stanza TEXT NOT NULL,
                PRIMARY KEY (host, username, stamp, random)
            )
            """,
            "CREATE INDEX archive_messages_peer ON archive_messages (host, username, peer, stamp)",
            "CREATE INDEX archive_messages_time ON archive_messages (host, stamp)",
            """
            CREATE TABLE archive_prefs (
                host TEXT NOT NULL, username TEXT NOT NULL, default_behaviour TEXT NOT NULL, always_list TEXT NOT NULL,
                never_list TEXT NOT NULL,
                PRIMARY KEY (host, username)
            )
            """,
        ],
        [
            // A PubSub service is named by (host, username): an account's PEP service, or a service's
            // domain with an empty username. `seq` orders a node's items by publication.
            """
            CREATE TABLE pubsub_nodes (
                host TEXT NOT NULL, username TEXT NOT NULL, node TEXT NOT NULL, config TEXT NOT NULL,
                PRIMARY KEY (host, username, node)
            )
            """,
            """
            CREATE TABLE pubsub_items (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                host TEXT NOT NULL, username TEXT NOT NULL, node TEXT NOT NULL, item_id TEXT NOT NULL,
                publisher TEXT NOT NULL, payload TEXT NOT NULL, published INTEGER NOT NULL,
                UNIQUE (host, username, node, item_id)
            )
            """,
            "CREATE INDEX pubsub_items_order ON pubsub_items (host, username, node, seq)",
        ],
        [
            """
            CREATE TABLE pubsub_subscriptions (
                host TEXT NOT NULL, username TEXT NOT NULL, node TEXT NOT NULL, jid TEXT NOT NULL, state TEXT NOT NULL,
                PRIMARY KEY (host, username, node, jid)
            )
            """,
        ],
        [
            "CREATE TABLE privacy_lists (host TEXT NOT NULL, username TEXT NOT NULL, name TEXT NOT NULL, rules TEXT NOT NULL, PRIMARY KEY (host, username, name))",
            "CREATE TABLE privacy_defaults (host TEXT NOT NULL, username TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (host, username))",
        ],
        [
            // XEP-0484: the token is derived from the server's key and `nonce`; only the nonce is stored.
            """
            CREATE TABLE fast_tokens (
                host TEXT NOT NULL, username TEXT NOT NULL, client TEXT NOT NULL, slot TEXT NOT NULL, mechanism TEXT NOT NULL,
                nonce BLOB NOT NULL, issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, software TEXT, device TEXT,
                PRIMARY KEY (host, username, client, slot),
                FOREIGN KEY (host, username) REFERENCES accounts (host, username) ON DELETE CASCADE
            )
            """,
        ],
        [
            // XEP-0357: `seq` keeps the order registrations were first enabled in.
            """
            CREATE TABLE push_registrations (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, host TEXT NOT NULL, username TEXT NOT NULL, service TEXT NOT NULL, node TEXT NOT NULL,
                publish_options TEXT,
                UNIQUE (host, username, service, node)
            )
            """,
        ],
    ]

    private init(thread: NIOThreadPool) {
        self.thread = thread
    }

    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    public static func open(path: String, logger: Logger) async throws(StorageError) -> SQLiteStore {
        let thread = NIOThreadPool(numberOfThreads: 1)
        thread.start()
        let store = SQLiteStore(thread: thread)
        do {
            try await store.onThread { db in
                do {
                    // busy_timeout: starlingctl and the server wait for each other's writes instead of failing.
                    try db.open(path: path, busyTimeoutMilliseconds: 5000)
                } catch {
                    throw StorageError.backend("cannot open SQLite database \(path): \(error)")
                }
                // WAL lets starlingctl read and write while the server runs.
                try db.query("PRAGMA journal_mode=WAL")
                try db.query("PRAGMA foreign_keys=ON")
                try Self.migrate(db)
            }
        } catch {
            await store.close()
            throw error
        }
        logger.debug("opened SQLite database", metadata: ["path": .string(path)])
        return store
    }

    private static func migrate(_ db: SQLiteHandle) throws {
        try db.query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        try db.transaction {
            let current = try db.query("SELECT MAX(version) AS version FROM schema_version").first?.column("version")?.integer ?? 0
            for (index, statements) in migrations.enumerated() where index + 1 > current {
                for statement in statements { try db.query(statement) }
                try db.query("INSERT INTO schema_version (version) VALUES (?)", [.integer(index + 1)])
            }
        }
    }

    /// Closes once the store has been quiet for a moment (at most two seconds of waiting): work that
    /// session closes queue at shutdown (presence broadcasts, last activity) still lands. Operations
    /// after that fail with a clear error instead of reaching a closed SQLite handle.
    public func close() async {
        let deadline = ContinuousClock.now + .seconds(2)
        while ContinuousClock.now < deadline, activity.withLock({ $0.usedWithin(.milliseconds(150)) }) {
            try? await Task.sleep(for: .milliseconds(50))
        }
        guard activity.withLock({ $0.markClosed() }) else { return }
        // Operations queued before this one still run; the thread then ends.
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            thread.submit { _ in
                self.handle.close()
                done.resume()
            }
        }
        try? await thread.shutdownGracefully()
    }

    /// Runs one store operation on the store's thread with the connection to itself, mapping failures
    /// to `StorageError`.
    @discardableResult
    func run<T: Sendable>(file: String = #fileID, function: String = #function,
                          _ body: @escaping @Sendable (SQLiteHandle) throws -> T) async throws(StorageError) -> T {
        guard activity.withLock({ $0.begin() }) else { throw Self.closedError }
        defer { activity.withLock { $0.end() } }
        return try await StorageMetrics.measure(backend: "sqlite", file: file, function: function) { () throws(StorageError) in
            try await onThread(body)
        }
    }

    private func onThread<T: Sendable>(_ body: @escaping @Sendable (SQLiteHandle) throws -> T) async throws(StorageError) -> T {
        let result: Result<T, StorageError> = await withCheckedContinuation { continuation in
            thread.submit { state in
                guard case .active = state, !self.handle.isClosed else { return continuation.resume(returning: .failure(Self.closedError)) }
                do {
                    continuation.resume(returning: .success(try body(self.handle)))
                } catch let error as StorageError {
                    continuation.resume(returning: .failure(error))
                } catch {
                    continuation.resume(returning: .failure(.backend(String(describing: error))))
                }
            }
        }
        return try result.get()
    }

    private static var closedError: StorageError { .backend("the database is closed (the server is shutting down)") }
}

/// Whether the store is open, and how recently it was used (closing waits for a quiet moment).
private struct Activity {
    private var isClosed = false
    private var running = 0
    private var lastUse = ContinuousClock.now

    /// Returns false once closed: the operation must not start.
    mutating func begin() -> Bool {
        guard !isClosed else { return false }
        running += 1
        lastUse = .now
        return true
    }

    mutating func end() {
        running -= 1
        lastUse = .now
    }

    /// Whether an operation is running or ended within `interval`.
    func usedWithin(_ interval: Duration) -> Bool {
        running > 0 || ContinuousClock.now - lastUse < interval
    }

    /// Returns whether this call closed it (false if it already was).
    mutating func markClosed() -> Bool {
        defer { isClosed = true }
        return !isClosed
    }
}
