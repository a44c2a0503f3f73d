import Foundation
import StarlingAPI

/// One message in an archive (XEP-0313): an account's, or a room's.
public struct ArchivedMessage: Sendable, Equatable {
    /// The archive's id for it, a `StanzaID`: ids order messages by the time they were archived.
    public var id: String
    /// The other party: for an account's archive, whom the message went to (sent) or came from
    /// (received); for a room's, the sender's real JID.
    public var with: JID
    /// The message as it was delivered, serialized.
    public var stanza: String
    /// The body text, for backends that offer full-text search.
    public var body: String?

    public init(id: String, with: JID, stanza: String, body: String? = nil) {
        self.id = id
        self.with = with
        self.stanza = stanza
        self.body = body
    }

    /// When it was archived (from its id).
    public var date: Date { StanzaID.date(of: id) ?? Date(timeIntervalSince1970: 0) }
}

/// Which messages of an archive a query asks for; every condition given must hold.
public struct ArchiveFilter: Sendable, Equatable {
    /// The other party: a bare JID matches all its resources, a full JID only itself.
    public var with: JID?
    /// Archived at or after / at or before.
    public var start: Date?
    public var end: Date?
    /// Only messages after / before this id (both exclusive). Ids the archive does not hold never
    /// reach a store: the query answers `<item-not-found/>` first.
    public var after: String?
    public var before: String?
    /// Only these ids.
    public var ids: [String]?
    /// Words the body must contain (backends with `supportsFullTextSearch` only).
    public var text: String?

    public init(with: JID? = nil, start: Date? = nil, end: Date? = nil, after: String? = nil, before: String? = nil,
                ids: [String]? = nil, text: String? = nil) {
        self.with = with
        self.start = start
        self.end = end
        self.after = after
        self.before = before
        self.ids = ids
        self.text = text
    }
}

/// One page of matching messages, oldest first.
public struct ArchivePage: Sendable, Equatable {
    public var messages: [ArchivedMessage]
    /// No further message matches beyond this page, in the direction it was read.
    public var complete: Bool

    public init(messages: [ArchivedMessage], complete: Bool) {
        self.messages = messages
        self.complete = complete
    }
}

/// XEP-0441 archiving preferences of one account.
public struct ArchivePreferences: Sendable, Equatable {
    public enum Default: String, Sendable, CaseIterable {
        case always, never, roster
    }

    public var defaultBehaviour: Default
    public var always: [JID]
    public var never: [JID]

    public init(defaultBehaviour: Default, always: [JID] = [], never: [JID] = []) {
        self.defaultBehaviour = defaultBehaviour
        self.always = always
        self.never = never
    }
}

/// Message archives (XEP-0313), each named by a JID: an account's bare JID, or a room's. Archives of
/// accounts go with the account when it is deleted; a room's with the room.
public protocol ArchiveStore: Sendable {
    /// Stores messages in their archives in one go. A message whose archive already holds its id is
    /// skipped, so a batch retried after an uncertain failure is not stored twice.
    func archive(_ entries: [(archive: JID, message: ArchivedMessage)]) async throws(StorageError)
    /// Matching messages, oldest first: the first `limit` of them, or the last `limit` when `fromEnd`.
    func archivedMessages(in archive: JID, matching filter: ArchiveFilter, limit: Int, fromEnd: Bool) async throws(StorageError) -> ArchivePage
    /// How many messages match.
    func archivedCount(in archive: JID, matching filter: ArchiveFilter) async throws(StorageError) -> Int
    /// Which of `ids` the archive holds.
    func archivedIDs(in archive: JID, among ids: [String]) async throws(StorageError) -> Set<String>
    /// Deletes the oldest messages beyond the newest `keep`; returns how many went.
    func trimArchive(_ archive: JID, keep: Int) async throws(StorageError) -> Int
    /// Deletes messages archived before `date`: in one archive (`user` set) or in every archive at
    /// `host` (a host of the server, or a MUC service's domain). Returns how many went.
    func purgeArchives(host: String, user: String?, before date: Date) async throws(StorageError) -> Int
    /// Deletes a whole archive.
    func deleteArchive(_ archive: JID) async throws(StorageError)
    /// True when `ArchiveFilter.text` works.
    var supportsFullTextSearch: Bool { get }
    /// How many `archive` calls are worth running at once (one connection or several).
    var concurrentArchiveWrites: Int { get }

    /// The preferences of every account at `host` that set any.
    func archivePreferences(host: String) async throws(StorageError) -> [JID: ArchivePreferences]
    /// Sets an account's preferences; nil removes them (the server's default applies).
    func setArchivePreferences(_ preferences: ArchivePreferences?, of user: JID) async throws(StorageError)
}

extension ArchiveStore {
    /// The archive's oldest and newest message; nil when it is empty.
    public func archiveBounds(of archive: JID) async throws(StorageError) -> (first: ArchivedMessage, last: ArchivedMessage)? {
        let first = try await archivedMessages(in: archive, matching: ArchiveFilter(), limit: 1, fromEnd: false).messages.first
        let last = try await archivedMessages(in: archive, matching: ArchiveFilter(), limit: 1, fromEnd: true).messages.first
        guard let first, let last else { return nil }
        return (first, last)
    }
}

extension ArchivePage {
    /// The page from up to `limit + 1` rows read in the page's direction (newest first when `fromEnd`):
    /// the extra row only says whether more match.
    public init(rows: [ArchivedMessage], limit: Int, fromEnd: Bool) {
        let page = Array(rows.prefix(limit))
        self.init(messages: fromEnd ? page.reversed() : page, complete: rows.count <= limit)
    }
}

/// What both backends share about archive rows.
public enum ArchiveRows {
    /// An id as the two columns that store it (stamp, random), or nil for something that is not an id.
    public static func key(_ id: String) -> (stamp: Int64, random: Int64)? {
        StanzaID.parts(of: id).map { (Int64(bitPattern: $0.stamp), Int64($0.random)) }
    }

    public static func id(stamp: Int64, random: Int64) -> String {
        StanzaID.make(stamp: UInt64(bitPattern: stamp), random: UInt32(truncatingIfNeeded: random))
    }

    /// `with` as stored: the bare JID, and the resource ("" for none).
    public static func peer(_ jid: JID) -> (bare: String, resource: String) {
        (jid.bare.description, jid.resourcepart ?? "")
    }

    public static func jid(bare: String, resource: String) -> JID? {
        JID(resource.isEmpty ? bare : "\(bare)/\(resource)")
    }

    /// Preference lists as stored: one JID per line.
    public static func list(_ jids: [JID]) -> String { jids.map(\.description).joined(separator: "\n") }
    public static func jids(_ text: String) -> [JID] { text.split(separator: "\n").compactMap { JID(String($0)) } }
}

/// The archive statements both backends run, written once: each backend supplies its placeholder
/// syntax and binds the values in order.
public struct ArchiveSQL: Sendable {
    public enum Value: Sendable, Equatable {
        case text(String)
        case integer(Int64)
    }

    public private(set) var sql: String
    public private(set) var values: [Value]
    private let placeholder: @Sendable (Int) -> String

    /// - Parameter placeholder: the n-th (1-based) bind's spelling: `?` or `$n`.
    public init(_ sql: String = "", placeholder: @escaping @Sendable (Int) -> String) {
        self.sql = sql
        self.values = []
        self.placeholder = placeholder
    }

    /// Appends SQL text in which each `?` takes the next of `values`.
    public mutating func append(_ text: String, _ values: Value...) {
        var remaining = values[...]
        for character in text {
            if character == "?", let value = remaining.popFirst() {
                self.values.append(value)
                sql += placeholder(self.values.count)
            } else {
                sql.append(character)
            }
        }
    }

    public static let columns = "stamp, random, peer, peer_resource, stanza"

    /// `WHERE ...` for one archive and a filter. `fullText` spells the text condition for one bind
    /// (backends without full-text search never get a filter with text).
    public mutating func condition(archive: JID, filter: ArchiveFilter, fullText: ((String) -> String)? = nil) {
        append(" WHERE host = ? AND username = ?", .text(archive.domainpart), .text(archive.localpart ?? ""))
        if let with = filter.with {
            let (bare, resource) = ArchiveRows.peer(with)
            append(" AND peer = ?", .text(bare))
            if with.resourcepart != nil { append(" AND peer_resource = ?", .text(resource)) }
        }
        if let start = filter.start { append(" AND stamp >= ?", .integer(Int64(bitPattern: StanzaID.firstStamp(at: start)))) }
        if let end = filter.end { append(" AND stamp <= ?", .integer(Int64(bitPattern: StanzaID.lastStamp(at: end)))) }
        if let after = filter.after.flatMap(ArchiveRows.key) { append(" AND (stamp, random) > (?, ?)", .integer(after.stamp), .integer(after.random)) }
        if let before = filter.before.flatMap(ArchiveRows.key) { append(" AND (stamp, random) < (?, ?)", .integer(before.stamp), .integer(before.random)) }
        if let ids = filter.ids {
            let keys = ids.compactMap(ArchiveRows.key)
            if keys.isEmpty {
                append(" AND 1 = 0")
            } else {
                append(" AND (")
                for (index, key) in keys.enumerated() {
                    append(index == 0 ? "(stamp = ? AND random = ?)" : " OR (stamp = ? AND random = ?)", .integer(key.stamp), .integer(key.random))
                }
                append(")")
            }
        }
        if let text = filter.text, let fullText { append(" AND " + fullText("?"), .text(text)) }
    }

    /// A selected row (in `columns` order) as a message; nil for a row that no longer parses.
    public static func message(stamp: Int64, random: Int64, peer: String, resource: String, stanza: String) -> ArchivedMessage? {
        guard let with = ArchiveRows.jid(bare: peer, resource: resource) else { return nil }
        return ArchivedMessage(id: ArchiveRows.id(stamp: stamp, random: random), with: with, stanza: stanza)
    }
}
