import Logging
import NIOCore
import NIOPosix
import SQLiteNIO

/// The embedded database: one SQLite file, WAL mode, statements run on NIO's thread pool so no event
/// loop ever waits on disk. Versioned migrations run at open.
public final class SQLiteStore: Sendable {
    let connection: SQLiteConnection
    /// One connection serves every caller: each operation has it to itself, so no statement lands inside
    /// another caller's transaction (and SQLite's per-connection error state is never shared).
    private let gate = ConnectionGate()

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

    private init(connection: SQLiteConnection) {
        self.connection = connection
    }

    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    public static func open(path: String, logger: Logger) async throws(StorageError) -> SQLiteStore {
        do {
            let connection = try await SQLiteConnection.open(
                storage: .file(path: path), threadPool: NIOThreadPool.singleton, logger: logger,
                on: MultiThreadedEventLoopGroup.singleton.any()
            )
            let store = SQLiteStore(connection: connection)
            // WAL lets starlingctl read and write while the server runs; busy_timeout makes the two wait
            // for each other instead of failing.
            _ = try await connection.query("PRAGMA journal_mode=WAL")
            _ = try await connection.query("PRAGMA busy_timeout=5000")
            _ = try await connection.query("PRAGMA foreign_keys=ON")
            try await store.migrate()
            return store
        } catch let error as StorageError {
            throw error
        } catch {
            throw .backend("cannot open SQLite database \(path): \(error)")
        }
    }

    private func migrate() async throws {
        _ = try await connection.query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        _ = try await connection.query("BEGIN IMMEDIATE")
        do {
            let rows = try await connection.query("SELECT MAX(version) AS version FROM schema_version")
            let current = rows.first?.column("version")?.integer ?? 0
            for (index, statements) in Self.migrations.enumerated() where index + 1 > current {
                for statement in statements { _ = try await connection.query(statement) }
                _ = try await connection.query("INSERT INTO schema_version (version) VALUES (?)", [.integer(index + 1)])
            }
            _ = try await connection.query("COMMIT")
        } catch {
            _ = try? await connection.query("ROLLBACK")
            throw error
        }
    }

    /// Closes once the store has been quiet for a moment (at most two seconds of waiting): work that
    /// session closes queue at shutdown (presence broadcasts, last activity) still lands. Operations
    /// after that fail with a clear error instead of reaching a closed SQLite handle.
    public func close() async {
        let deadline = ContinuousClock.now + .seconds(2)
        while ContinuousClock.now < deadline, await gate.usedWithin(.milliseconds(150)) {
            try? await Task.sleep(for: .milliseconds(50))
        }
        await gate.acquire()
        if await gate.markClosed() { try? await connection.close() }
        await gate.release()
    }

    /// Runs one store operation with the connection to itself, mapping failures to `StorageError`.
    func run<T>(file: String = #fileID, function: String = #function, _ body: () async throws -> T) async throws(StorageError) -> T {
        try await StorageMetrics.measure(backend: "sqlite", file: file, function: function) { () throws(StorageError) in try await runGated(body) }
    }

    private func runGated<T>(_ body: () async throws -> T) async throws(StorageError) -> T {
        await gate.acquire()
        if await gate.isClosed {
            await gate.release()
            throw .backend("the database is closed (the server is shutting down)")
        }
        do {
            let value = try await body()
            await gate.release()
            return value
        } catch {
            await gate.release()
            if let error = error as? StorageError { throw error }
            throw .backend(String(describing: error))
        }
    }

    /// Runs `body` inside a transaction, rolling back on any error. Only inside `run`.
    func transaction<T>(_ body: () async throws -> T) async throws -> T {
        _ = try await connection.query("BEGIN IMMEDIATE")
        do {
            let result = try await body()
            _ = try await connection.query("COMMIT")
            return result
        } catch {
            _ = try? await connection.query("ROLLBACK")
            throw error
        }
    }
}

/// A FIFO async mutex: the connection runs one operation at a time.
actor ConnectionGate {
    private(set) var isClosed = false
    private var busy = false
    private var lastUse = ContinuousClock.now
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func acquire() async {
        lastUse = .now
        if !busy {
            busy = true
            return
        }
        await withCheckedContinuation { waiters.append($0) }
    }

    func release() {
        if waiters.isEmpty { busy = false } else { waiters.removeFirst().resume() }
    }

    /// Whether an operation is running or started within `interval`.
    func usedWithin(_ interval: Duration) -> Bool {
        busy || ContinuousClock.now - lastUse < interval
    }

    /// Returns whether this call closed it (false if it already was).
    func markClosed() -> Bool {
        defer { isClosed = true }
        return !isClosed
    }
}

@_exported import StarlingStorage
