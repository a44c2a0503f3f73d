import Foundation
import SQLiteNIO
import StarlingAPI
import StarlingStorage

extension SQLiteStore: ArchiveStore {
    public var supportsFullTextSearch: Bool { false }
    /// One connection: batches queue behind each other anyway.
    public var concurrentArchiveWrites: Int { 1 }

    private static func statement(_ sql: String = "") -> ArchiveSQL { ArchiveSQL(sql) { _ in "?" } }

    @discardableResult
    private static func rows(_ db: SQLiteHandle, _ statement: ArchiveSQL) throws -> [SQLiteResultRow] {
        try db.query(statement.sql, statement.values.map { value -> SQLiteData in
            switch value {
            case .text(let text): return .text(text)
            case .integer(let number): return .integer(Int(number))
            }
        })
    }

    private static func message(_ row: SQLiteResultRow) -> ArchivedMessage? {
        guard let stamp = row.column("stamp")?.integer, let random = row.column("random")?.integer,
              let peer = row.column("peer")?.string, let resource = row.column("peer_resource")?.string,
              let stanza = row.column("stanza")?.string else { return nil }
        return ArchiveSQL.message(stamp: Int64(stamp), random: Int64(random), peer: peer, resource: resource, stanza: stanza)
    }

    public func archive(_ entries: [(archive: JID, message: ArchivedMessage)]) async throws(StorageError) {
        // At most 100 rows per statement keeps the binds well under SQLite's limit.
        let rows = entries.compactMap { entry -> [ArchiveSQL.Value]? in
            guard let key = ArchiveRows.key(entry.message.id) else { return nil }
            let (peer, resource) = ArchiveRows.peer(entry.message.with)
            return [.text(entry.archive.domainpart), .text(entry.archive.localpart ?? ""), .integer(key.stamp), .integer(key.random),
                    .text(peer), .text(resource), .text(entry.message.stanza)]
        }
        guard !rows.isEmpty else { return }
        try await run { db in
            try db.transaction {
                for start in stride(from: 0, to: rows.count, by: 100) {
                    let chunk = rows[start..<min(start + 100, rows.count)]
                    var statement = Self.statement("INSERT OR IGNORE INTO archive_messages (host, username, \(ArchiveSQL.columns)) VALUES ")
                    for (index, row) in chunk.enumerated() {
                        if index > 0 { statement.append(", ") }
                        statement.append("(?, ?, ?, ?, ?, ?, ?)", row[0], row[1], row[2], row[3], row[4], row[5], row[6])
                    }
                    try Self.rows(db, statement)
                }
            }
        }
    }

    public func archivedMessages(in archive: JID, matching filter: ArchiveFilter, limit: Int, fromEnd: Bool) async throws(StorageError) -> ArchivePage {
        var statement = Self.statement("SELECT \(ArchiveSQL.columns) FROM archive_messages")
        statement.condition(archive: archive, filter: filter)
        let order = fromEnd ? "DESC" : "ASC"
        statement.append(" ORDER BY stamp \(order), random \(order) LIMIT ?", .integer(Int64(limit + 1)))
        let found = try await run { [statement] db in try Self.rows(db, statement) }.compactMap(Self.message)
        return ArchivePage(rows: found, limit: limit, fromEnd: fromEnd)
    }

    public func archivedCount(in archive: JID, matching filter: ArchiveFilter) async throws(StorageError) -> Int {
        var statement = Self.statement("SELECT COUNT(*) AS n FROM archive_messages")
        statement.condition(archive: archive, filter: filter)
        return try await run { [statement] db in try Self.rows(db, statement).first?.column("n")?.integer ?? 0 }
    }

    public func archivedIDs(in archive: JID, among ids: [String]) async throws(StorageError) -> Set<String> {
        var statement = Self.statement("SELECT \(ArchiveSQL.columns) FROM archive_messages")
        statement.condition(archive: archive, filter: ArchiveFilter(ids: ids))
        return Set(try await run { [statement] db in try Self.rows(db, statement) }.compactMap(Self.message).map(\.id))
    }

    public func trimArchive(_ archive: JID, keep: Int) async throws(StorageError) -> Int {
        try await run { db in
            try db.query(
                """
                DELETE FROM archive_messages WHERE host = ? AND username = ? AND (stamp, random) < (
                    SELECT stamp, random FROM archive_messages WHERE host = ? AND username = ?
                    ORDER BY stamp DESC, random DESC LIMIT 1 OFFSET ?) RETURNING stamp
                """, Self.userBinds(archive) + Self.userBinds(archive) + [.integer(max(0, keep - 1))]
            ).count
        }
    }

    public func purgeArchives(host: String, user: String?, before date: Date) async throws(StorageError) -> Int {
        // In slices, so the one connection is never held for long by an old, large archive.
        var statement = Self.statement()
        statement.append("DELETE FROM archive_messages WHERE rowid IN (SELECT rowid FROM archive_messages WHERE host = ?", .text(host))
        if let user { statement.append(" AND username = ?", .text(user)) }
        statement.append(" AND stamp < ? LIMIT 10000) RETURNING stamp", .integer(Int64(bitPattern: StanzaID.firstStamp(at: date))))
        var total = 0
        while true {
            let deleted = try await run { [statement] db in try Self.rows(db, statement).count }
            total += deleted
            if deleted < 10_000 { return total }
        }
    }

    public func deleteArchive(_ archive: JID) async throws(StorageError) {
        try await run { db in
            try db.query("DELETE FROM archive_messages WHERE host = ? AND username = ?", Self.userBinds(archive))
        }
    }

    public func archivePreferences(host: String) async throws(StorageError) -> [JID: ArchivePreferences] {
        try await run { db in
            var result: [JID: ArchivePreferences] = [:]
            for row in try db.query(
                "SELECT username, default_behaviour, always_list, never_list FROM archive_prefs WHERE host = ?", [.text(host)]) {
                guard let username = row.column("username")?.string, let user = try? JID(localpart: username, domainpart: host),
                      let behaviour = row.column("default_behaviour")?.string.flatMap(ArchivePreferences.Default.init(rawValue:)) else { continue }
                result[user] = ArchivePreferences(defaultBehaviour: behaviour, always: ArchiveRows.jids(row.column("always_list")?.string ?? ""),
                                                  never: ArchiveRows.jids(row.column("never_list")?.string ?? ""))
            }
            return result
        }
    }

    public func setArchivePreferences(_ preferences: ArchivePreferences?, of user: JID) async throws(StorageError) {
        try await run { db in
            guard let preferences else {
                try db.query("DELETE FROM archive_prefs WHERE host = ? AND username = ?", Self.userBinds(user))
                return
            }
            try db.query(
                """
                INSERT INTO archive_prefs (host, username, default_behaviour, always_list, never_list) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (host, username) DO UPDATE SET default_behaviour = excluded.default_behaviour,
                    always_list = excluded.always_list, never_list = excluded.never_list
                """, Self.userBinds(user) + [.text(preferences.defaultBehaviour.rawValue), .text(ArchiveRows.list(preferences.always)),
                                             .text(ArchiveRows.list(preferences.never))])
        }
    }
}
