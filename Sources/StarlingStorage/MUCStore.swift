import Foundation
import StarlingAPI

/// One user's lasting relation to a room: an affiliation, maybe a reserved nickname, maybe a reason
/// (for bans).
public struct MUCAffiliationRecord: Sendable, Equatable, Codable {
    public var affiliation: MUCAffiliation
    public var nick: String?
    public var reason: String?

    public init(affiliation: MUCAffiliation, nick: String? = nil, reason: String? = nil) {
        self.affiliation = affiliation
        self.nick = nick
        self.reason = reason
    }
}

/// A persistent room as stored: its configuration, subject and affiliations (occupants and history
/// live in memory only).
public struct StoredMUCRoom: Sendable, Equatable {
    /// The room's bare JID.
    public var jid: JID
    public var options: MUCRoomOptions
    public var subject: String
    public var subjectNick: String?
    /// Unix seconds of the last subject change.
    public var subjectTime: Int?
    /// Keys the room's XEP-0421 occupant ids, so they stay the same across restarts.
    public var salt: String
    public var affiliations: [JID: MUCAffiliationRecord]

    public init(jid: JID, options: MUCRoomOptions, subject: String = "", subjectNick: String? = nil, subjectTime: Int? = nil, salt: String,
                affiliations: [JID: MUCAffiliationRecord] = [:]) {
        self.jid = jid
        self.options = options
        self.subject = subject
        self.subjectNick = subjectNick
        self.subjectTime = subjectTime
        self.salt = salt
        self.affiliations = affiliations
    }
}

/// Persistent MUC rooms (XEP-0045), per service domain.
public protocol MUCStore: Sendable {
    /// Every stored room of `service`, with its affiliations.
    func mucRooms(service: String) async throws(StorageError) -> [StoredMUCRoom]
    /// Creates the room or replaces its configuration, subject and salt; its affiliations stay as they are.
    func saveMUCRoom(_ room: StoredMUCRoom) async throws(StorageError)
    /// Creates or replaces the room with exactly the affiliations it has, in one transaction (a room
    /// that has just become persistent).
    func replaceMUCRoom(_ room: StoredMUCRoom) async throws(StorageError)
    /// Sets one user's affiliation; `.none` removes the user's record.
    func setMUCAffiliation(room: JID, user: JID, _ record: MUCAffiliationRecord) async throws(StorageError)
    /// Removes the room and its affiliations.
    func deleteMUCRoom(_ room: JID) async throws(StorageError)
}

/// How both backends store a room's options: JSON, so options added later need no migration.
public enum MUCOptionsCoding {
    public static func encode(_ options: MUCRoomOptions) -> String {
        String(decoding: (try? JSONEncoder().encode(options)) ?? Data("{}".utf8), as: UTF8.self)
    }

    public static func decode(_ text: String, room: String) throws(StorageError) -> MUCRoomOptions {
        do { return try JSONDecoder().decode(MUCRoomOptions.self, from: Data(text.utf8)) } catch {
            throw .backend("room \(room): stored options are unreadable: \(error)")
        }
    }
}
