import Foundation
import PostgresNIO
import StarlingAPI
import StarlingStorage

extension PostgresStore: ArchiveStore {
    public var supportsFullTextSearch: Bool { true }
    /// Several pooled connections take batches side by side; the rest of the pool stays for everything else.
    public var concurrentArchiveWrites: Int { max(1, poolSize / 3) }

    private static func statement(_ sql: String = "") -> ArchiveSQL { ArchiveSQL(sql) { "$\($0)" } }

    private static func query(_ statement: ArchiveSQL) -> PostgresQuery {
        var bindings = PostgresBindings()
        for value in statement.values {
            switch value {
            case .text(let text): bindings.append(text)
            case .integer(let number): bindings.append(number)
            }
        }
        return PostgresQuery(unsafeSQL: statement.sql, binds: bindings)
    }

    private static let fullText: (String) -> String = { "to_tsvector('simple', body) @@ plainto_tsquery('simple', \($0))" }

    private func messages(_ statement: ArchiveSQL) async throws(StorageError) -> [ArchivedMessage] {
        try await run { [client, logger] in
            var found: [ArchivedMessage] = []
            for try await (stamp, random, peer, resource, stanza) in try await client.query(Self.query(statement), logger: logger)
                .decode((Int64, Int64, String, String, String).self) {
                if let message = ArchiveSQL.message(stamp: stamp, random: random, peer: peer, resource: resource, stanza: stanza) {
                    found.append(message)
                }
            }
            return found
        }
    }

    private func count(_ statement: ArchiveSQL) async throws(StorageError) -> Int {
        try await run { [client, logger] in
            var total = 0
            for try await value in try await client.query(Self.query(statement), logger: logger).decode(Int64.self) { total += Int(value) }
            return total
        }
    }

    public func archive(_ entries: [(archive: JID, message: ArchivedMessage)]) async throws(StorageError) {
        // One statement for the whole batch: columns as arrays, unnested into rows.
        var hosts: [String] = [], users: [String] = [], stamps: [Int64] = [], randoms: [Int64] = []
        var peers: [String] = [], resources: [String] = [], stanzas: [String] = [], bodies: [String] = []
        for entry in entries {
            guard let key = ArchiveRows.key(entry.message.id) else { continue }
            let (peer, resource) = ArchiveRows.peer(entry.message.with)
            hosts.append(entry.archive.domainpart)
            users.append(entry.archive.localpart ?? "")
            stamps.append(key.stamp)
            randoms.append(key.random)
            peers.append(peer)
            resources.append(resource)
            stanzas.append(entry.message.stanza)
            bodies.append(entry.message.body ?? "")
        }
        guard !hosts.isEmpty else { return }
        try await run { [client, logger, hosts, users, stamps, randoms, peers, resources, stanzas, bodies] in
            try await client.query(
                """
                INSERT INTO archive_messages (host, username, stamp, random, peer, peer_resource, stanza, body)
                SELECT h, u, s, r, p, pr, st, NULLIF(b, '') FROM UNNEST(\(hosts)::TEXT[], \(users)::TEXT[], \(stamps)::BIGINT[],
                    \(randoms)::BIGINT[], \(peers)::TEXT[], \(resources)::TEXT[], \(stanzas)::TEXT[], \(bodies)::TEXT[]) AS t(h, u, s, r, p, pr, st, b)
                ON CONFLICT DO NOTHING
                """, logger: logger)
        }
    }

    public func archivedMessages(in archive: JID, matching filter: ArchiveFilter, limit: Int, fromEnd: Bool) async throws(StorageError) -> ArchivePage {
        var statement = Self.statement("SELECT \(ArchiveSQL.columns) FROM archive_messages")
        statement.condition(archive: archive, filter: filter, fullText: Self.fullText)
        let order = fromEnd ? "DESC" : "ASC"
        statement.append(" ORDER BY stamp \(order), random \(order) LIMIT ?", .integer(Int64(limit + 1)))
        let found = try await messages(statement)
        return ArchivePage(rows: found, limit: limit, fromEnd: fromEnd)
    }

    public func archivedCount(in archive: JID, matching filter: ArchiveFilter) async throws(StorageError) -> Int {
        var statement = Self.statement("SELECT COUNT(*)::BIGINT FROM archive_messages")
        statement.condition(archive: archive, filter: filter, fullText: Self.fullText)
        return try await count(statement)
    }

    public func archivedIDs(in archive: JID, among ids: [String]) async throws(StorageError) -> Set<String> {
        var statement = Self.statement("SELECT \(ArchiveSQL.columns) FROM archive_messages")
        statement.condition(archive: archive, filter: ArchiveFilter(ids: ids))
        return Set(try await messages(statement).map(\.id))
    }

    public func trimArchive(_ archive: JID, keep: Int) async throws(StorageError) -> Int {
        var statement = Self.statement()
        statement.append("""
            WITH gone AS (DELETE FROM archive_messages WHERE host = ? AND username = ? AND (stamp, random) < (
                SELECT stamp, random FROM archive_messages WHERE host = ? AND username = ?
                ORDER BY stamp DESC, random DESC LIMIT 1 OFFSET ?) RETURNING 1)
            SELECT COUNT(*)::BIGINT FROM gone
            """, .text(archive.domainpart), .text(archive.localpart ?? ""), .text(archive.domainpart), .text(archive.localpart ?? ""),
            .integer(Int64(max(0, keep - 1))))
        return try await count(statement)
    }

    public func purgeArchives(host: String, user: String?, before date: Date) async throws(StorageError) -> Int {
        // In slices, so that no single statement outlives the operation deadline on a large archive.
        var statement = Self.statement()
        statement.append("""
            WITH gone AS (DELETE FROM archive_messages WHERE ctid IN (
                SELECT ctid FROM archive_messages WHERE host = ?
            """, .text(host))
        if let user { statement.append(" AND username = ?", .text(user)) }
        statement.append(" AND stamp < ? LIMIT 10000) RETURNING 1) SELECT COUNT(*)::BIGINT FROM gone",
                         .integer(Int64(bitPattern: StanzaID.firstStamp(at: date))))
        var total = 0
        while true {
            let deleted = try await count(statement)
            total += deleted
            if deleted < 10_000 { return total }
        }
    }

    public func deleteArchive(_ archive: JID) async throws(StorageError) {
        let (host, username) = (archive.domainpart, archive.localpart ?? "")
        try await run { [client, logger] in
            try await client.query("DELETE FROM archive_messages WHERE host = \(host) AND username = \(username)", logger: logger)
        }
    }

    public func archivePreferences(host: String) async throws(StorageError) -> [JID: ArchivePreferences] {
        try await run { [client, logger] in
            var result: [JID: ArchivePreferences] = [:]
            for try await (username, behaviour, always, never) in try await client.query(
                "SELECT username, default_behaviour, always_list, never_list FROM archive_prefs WHERE host = \(host)", logger: logger
            ).decode((String, String, String, String).self) {
                guard let user = try? JID(localpart: username, domainpart: host),
                      let behaviour = ArchivePreferences.Default(rawValue: behaviour) else { continue }
                result[user] = ArchivePreferences(defaultBehaviour: behaviour, always: ArchiveRows.jids(always), never: ArchiveRows.jids(never))
            }
            return result
        }
    }

    public func setArchivePreferences(_ preferences: ArchivePreferences?, of user: JID) async throws(StorageError) {
        let (host, username) = (user.domainpart, user.localpart ?? "")
        try await run { [client, logger] in
            guard let preferences else {
                try await client.query("DELETE FROM archive_prefs WHERE host = \(host) AND username = \(username)", logger: logger)
                return
            }
            let (behaviour, always, never) = (preferences.defaultBehaviour.rawValue, ArchiveRows.list(preferences.always), ArchiveRows.list(preferences.never))
            try await client.query(
                """
                INSERT INTO archive_prefs (host, username, default_behaviour, always_list, never_list)
                VALUES (\(host), \(username), \(behaviour), \(always), \(never))
                ON CONFLICT (host, username) DO UPDATE SET default_behaviour = EXCLUDED.default_behaviour,
                    always_list = EXCLUDED.always_list, never_list = EXCLUDED.never_list
                """, logger: logger)
        }
    }
}
