import Foundation
import Logging
import PostgresNIO
import StarlingStorage
import Synchronization

/// The PostgreSQL backend: postgres-nio's connection pool (non-blocking), versioned migrations under an
/// advisory lock so that two nodes starting at once migrate once, and a deadline on every operation so
/// that a database that went away fails that request instead of holding it forever.
public final class PostgresStore: Sendable {
    public struct Options: Sendable {
        public var url: String
        public var poolSize: Int
        /// Seconds one storage operation may take before it fails.
        public var timeout: Double

        public init(url: String, poolSize: Int = 10, timeout: Double = 5) {
            self.url = url
            self.poolSize = poolSize
            self.timeout = timeout
        }
    }

    let client: PostgresClient
    let logger: Logger
    let timeout: Double
    /// Connections in the pool.
    let poolSize: Int
    private let runner: Task<Void, Never>
    /// Operations running, and when the last one started: `close` waits for a quiet moment.
    private let activity = Mutex<(running: Int, lastStart: ContinuousClock.Instant)>((0, .now))

    /// Each entry is one schema version; append, never edit.
    static let migrations: [[String]] = [
        [
            "CREATE TABLE accounts (host TEXT NOT NULL, username TEXT NOT NULL, created_at BIGINT NOT NULL, PRIMARY KEY (host, username))",
            """
            CREATE TABLE scram_credentials (
                host TEXT NOT NULL, username TEXT NOT NULL, hash TEXT NOT NULL, salt BYTEA NOT NULL, iterations INTEGER NOT NULL,
                stored_key BYTEA NOT NULL, server_key BYTEA NOT NULL,
                PRIMARY KEY (host, username, hash),
                FOREIGN KEY (host, username) REFERENCES accounts (host, username) ON DELETE CASCADE
            )
            """,
        ],
        [
            """
            CREATE TABLE roster_items (
                host TEXT NOT NULL, username TEXT NOT NULL, contact TEXT NOT NULL, name TEXT, groups TEXT NOT NULL,
                subscription TEXT NOT NULL, ask BOOLEAN NOT NULL, approved BOOLEAN NOT NULL,
                PRIMARY KEY (host, username, contact)
            )
            """,
            "CREATE TABLE roster_versions (host TEXT NOT NULL, username TEXT NOT NULL, version BIGINT NOT NULL, PRIMARY KEY (host, username))",
            "CREATE TABLE roster_pending (host TEXT NOT NULL, username TEXT NOT NULL, contact TEXT NOT NULL, stanza TEXT NOT NULL, PRIMARY KEY (host, username, contact))",
        ],
        [
            "CREATE TABLE offline_messages (id BIGSERIAL PRIMARY KEY, host TEXT NOT NULL, username TEXT NOT NULL, stanza TEXT NOT NULL, stored_at BIGINT NOT NULL)",
            "CREATE INDEX offline_messages_user ON offline_messages (host, username, id)",
            "CREATE TABLE blocklist (host TEXT NOT NULL, username TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (host, username, item))",
            """
            CREATE TABLE private_xml (
                host TEXT NOT NULL, username TEXT NOT NULL, name TEXT NOT NULL, namespace TEXT NOT NULL, xml TEXT NOT NULL,
                PRIMARY KEY (host, username, name, namespace)
            )
            """,
            "CREATE TABLE vcards (host TEXT NOT NULL, username TEXT NOT NULL, xml TEXT NOT NULL, photo_hash TEXT, PRIMARY KEY (host, username))",
            "CREATE TABLE last_activity (host TEXT NOT NULL, username TEXT NOT NULL, seconds BIGINT NOT NULL, status TEXT NOT NULL, PRIMARY KEY (host, username))",
        ],
        [
            """
            CREATE TABLE muc_rooms (
                service TEXT NOT NULL, name TEXT NOT NULL, options TEXT NOT NULL, subject TEXT NOT NULL, subject_nick TEXT,
                subject_time BIGINT, salt TEXT NOT NULL,
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
                host TEXT NOT NULL, username TEXT NOT NULL, stamp BIGINT NOT NULL, random BIGINT NOT NULL,
                peer TEXT NOT NULL, peer_resource TEXT NOT NULL, stanza TEXT NOT NULL, body TEXT,
                PRIMARY KEY (host, username, stamp, random)
            )
            """,
            "CREATE INDEX archive_messages_peer ON archive_messages (host, username, peer, stamp)",
            "CREATE INDEX archive_messages_time ON archive_messages (host, stamp)",
            "CREATE INDEX archive_messages_text ON archive_messages USING GIN (to_tsvector('simple', body))",
            """
            CREATE TABLE archive_prefs (
                host TEXT NOT NULL, username TEXT NOT NULL, default_behaviour TEXT NOT NULL, always_list TEXT NOT NULL,
                never_list TEXT NOT NULL,
                PRIMARY KEY (host, username)
            )
            """,
        ],
        [
            """
            CREATE TABLE cluster_nodes (
                cluster TEXT NOT NULL, node TEXT NOT NULL, link TEXT NOT NULL, started_at BIGINT NOT NULL,
                heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (cluster, node)
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
                seq BIGSERIAL PRIMARY KEY,
                host TEXT NOT NULL, username TEXT NOT NULL, node TEXT NOT NULL, item_id TEXT NOT NULL,
                publisher TEXT NOT NULL, payload TEXT NOT NULL, published BIGINT NOT NULL,
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
                nonce BYTEA NOT NULL, issued_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, software TEXT, device TEXT,
                PRIMARY KEY (host, username, client, slot),
                FOREIGN KEY (host, username) REFERENCES accounts (host, username) ON DELETE CASCADE
            )
            """,
        ],
        [
            // XEP-0357: `seq` keeps the order registrations were first enabled in.
            """
            CREATE TABLE push_registrations (
                seq BIGSERIAL PRIMARY KEY, host TEXT NOT NULL, username TEXT NOT NULL, service TEXT NOT NULL, node TEXT NOT NULL,
                publish_options TEXT,
                UNIQUE (host, username, service, node)
            )
            """,
        ],
    ]

    private init(client: PostgresClient, logger: Logger, timeout: Double, poolSize: Int) {
        self.client = client
        self.logger = logger
        self.timeout = timeout
        self.poolSize = poolSize
        // Detached: a task would inherit the service group's graceful-shutdown signal, and the pool would
        // shut down on SIGTERM before the sessions' last writes; `close` ends it instead.
        runner = Task.detached { await client.run() }
    }

    /// Connects, checks the database answers, and migrates. A bad URL or an unreachable database is a
    /// clear error here, at start.
    public static func open(_ options: Options, logger: Logger) async throws(StorageError) -> PostgresStore {
        let configuration = try configuration(from: options)
        let store = PostgresStore(client: PostgresClient(configuration: configuration, backgroundLogger: logger), logger: logger, timeout: options.timeout, poolSize: options.poolSize)
        do {
            try await store.run { try await store.migrate() }
        } catch {
            await store.close()
            throw .backend("cannot use PostgreSQL at \(redacted(options.url)): \(error.description)")
        }
        return store
    }

    /// Closes once the store has been quiet for a moment (at most two seconds of waiting): work that
    /// session closes queue at shutdown (presence broadcasts, last activity) still lands.
    public func close() async {
        let deadline = ContinuousClock.now + .seconds(2)
        while ContinuousClock.now < deadline,
              activity.withLock({ $0.running > 0 || ContinuousClock.now - $0.lastStart < .milliseconds(150) }) {
            try? await Task.sleep(for: .milliseconds(50))
        }
        runner.cancel()
        _ = await runner.value
    }

    /// `postgresql://user:password@host:port/database`, or with `?host=/path/to/socket/dir`.
    static func configuration(from options: Options) throws(StorageError) -> PostgresClient.Configuration {
        guard let components = URLComponents(string: options.url), components.scheme == "postgresql" || components.scheme == "postgres" else {
            throw .backend("storage.url must look like postgresql://user:password@host:5432/database, not '\(redacted(options.url))'")
        }
        let user = components.user ?? "postgres"
        let password = components.password
        let database = components.path.hasPrefix("/") ? String(components.path.dropFirst()) : components.path
        var configuration: PostgresClient.Configuration
        if let socketDirectory = components.queryItems?.first(where: { $0.name == "host" })?.value, socketDirectory.hasPrefix("/") {
            let port = components.port ?? 5432
            configuration = .init(unixSocketPath: "\(socketDirectory)/.s.PGSQL.\(port)", username: user, password: password, database: database.isEmpty ? nil : database)
        } else {
            guard let host = components.host, !host.isEmpty else { throw .backend("storage.url has no host: '\(redacted(options.url))'") }
            configuration = .init(host: host, port: components.port ?? 5432, username: user, password: password,
                                  database: database.isEmpty ? nil : database, tls: .disable)
        }
        configuration.options.maximumConnections = options.poolSize
        configuration.options.connectTimeout = .seconds(Int64(max(1, options.timeout)))
        return configuration
    }

    static func redacted(_ url: String) -> String {
        guard var components = URLComponents(string: url), components.password != nil else { return url }
        components.password = "***"
        return components.string ?? url
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? PostgresTransactionError {
            if let inner = error.closureError { return describe(inner) }
            if let inner = error.beginError ?? error.commitError { return describe(inner) }
        }
        if let error = error as? PSQLError {
            if let message = error.serverInfo?[.message] { return message }
            return "\(error.code)"
        }
        return "\(error)"
    }

    func migrate() async throws {
        try await client.withTransaction(logger: logger) { connection in
            // One node migrates at a time; the others wait here and then find nothing to do.
            try await connection.query("SELECT pg_advisory_xact_lock(4242424242)", logger: logger)
            try await connection.query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)", logger: logger)
            var current = 0
            for try await version in try await connection.query("SELECT COALESCE(MAX(version), 0) FROM schema_version", logger: logger).decode(Int.self) {
                current = version
            }
            for (index, statements) in Self.migrations.enumerated() where index + 1 > current {
                for statement in statements { try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger) }
                try await connection.query("INSERT INTO schema_version (version) VALUES (\(index + 1))", logger: logger)
            }
        }
    }

    /// Runs one storage operation with the deadline, mapping every failure to `StorageError`. The caller
    /// gets its answer at the deadline even if the operation itself cannot be interrupted (a connection
    /// lease waiting for a database that is gone): that one is cancelled and left to finish on its own.
    @discardableResult
    func run<T: Sendable>(file: String = #fileID, function: String = #function, _ body: @escaping @Sendable () async throws -> T) async throws(StorageError) -> T {
        try await StorageMetrics.measure(backend: "postgresql", file: file, function: function) { () throws(StorageError) in try await runWithDeadline(body) }
    }

    private func runWithDeadline<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) async throws(StorageError) -> T {
        activity.withLock { $0 = ($0.running + 1, .now) }
        defer { activity.withLock { $0.running -= 1 } }
        let timeout = self.timeout
        let operation = Task { try await body() }
        let outcome: Result<T, any Error> = await withCheckedContinuation { continuation in
            let answered = Mutex(false)
            let answer: @Sendable (Result<T, any Error>) -> Void = { result in
                if answered.withLock({ done in defer { done = true }; return !done }) { continuation.resume(returning: result) }
            }
            Task { answer(await operation.result) }
            Task {
                try? await Task.sleep(for: .milliseconds(Int64(timeout * 1000)))
                operation.cancel()
                answer(.failure(StorageError.backend("PostgreSQL did not answer within \(timeout) s")))
            }
        }
        switch outcome {
        case .success(let value):
            return value
        case .failure(let error as StorageError):
            throw error
        case .failure(let error as PostgresTransactionError) where error.closureError is StorageError:
            // A contract error (exists, not found) raised inside a transaction.
            throw error.closureError as! StorageError
        case .failure(let error):
            throw .backend(Self.describe(error))
        }
    }
}
