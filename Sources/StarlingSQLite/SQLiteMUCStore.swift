import SQLiteNIO
import StarlingAPI
import StarlingStorage

extension SQLiteStore: MUCStore {
    public func mucRooms(service: String) async throws(StorageError) -> [StoredMUCRoom] {
        try await run { db in
            var rooms: [String: StoredMUCRoom] = [:]
            for row in try db.query(
                "SELECT name, options, subject, subject_nick, subject_time, salt FROM muc_rooms WHERE service = ?", [.text(service)]) {
                guard let name = row.column("name")?.string, let jid = JID("\(name)@\(service)") else { continue }
                rooms[name] = StoredMUCRoom(
                    jid: jid, options: try MUCOptionsCoding.decode(row.column("options")?.string ?? "{}", room: jid.description),
                    subject: row.column("subject")?.string ?? "", subjectNick: row.column("subject_nick")?.string,
                    subjectTime: row.column("subject_time")?.integer, salt: row.column("salt")?.string ?? "")
            }
            for row in try db.query(
                "SELECT name, jid, affiliation, nick, reason FROM muc_affiliations WHERE service = ?", [.text(service)]) {
                guard let name = row.column("name")?.string, let user = row.column("jid")?.string.flatMap(JID.init),
                      let affiliation = row.column("affiliation")?.string.flatMap(MUCAffiliation.init(rawValue:)) else { continue }
                rooms[name]?.affiliations[user] = MUCAffiliationRecord(affiliation: affiliation, nick: row.column("nick")?.string,
                                                                       reason: row.column("reason")?.string)
            }
            return rooms.keys.sorted().map { rooms[$0]! }
        }
    }

    public func saveMUCRoom(_ room: StoredMUCRoom) async throws(StorageError) {
        try await run { db in try Self.upsertRoom(db, room) }
    }

    public func replaceMUCRoom(_ room: StoredMUCRoom) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                try Self.upsertRoom(db, room)
                try db.query("DELETE FROM muc_affiliations WHERE service = ? AND name = ?", Self.roomBinds(room.jid))
                for (user, record) in room.affiliations where record.affiliation != .none {
                    try Self.insertAffiliation(db, room: room.jid, user: user, record)
                }
            }
        }
    }

    public func setMUCAffiliation(room: JID, user: JID, _ record: MUCAffiliationRecord) async throws(StorageError) {
        try await run { db in
            if record.affiliation == .none {
                try db.query(
                    "DELETE FROM muc_affiliations WHERE service = ? AND name = ? AND jid = ?", Self.roomBinds(room) + [.text(user.description)])
            } else {
                try Self.insertAffiliation(db, room: room, user: user, record)
            }
        }
    }

    public func deleteMUCRoom(_ room: JID) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                try db.query("DELETE FROM muc_affiliations WHERE service = ? AND name = ?", Self.roomBinds(room))
                try db.query("DELETE FROM muc_rooms WHERE service = ? AND name = ?", Self.roomBinds(room))
            }
        }
    }

    private static func roomBinds(_ room: JID) -> [SQLiteData] { [.text(room.domainpart), .text(room.localpart ?? "")] }

    private static func upsertRoom(_ db: SQLiteHandle, _ room: StoredMUCRoom) throws {
        try db.query(
            """
            INSERT INTO muc_rooms (service, name, options, subject, subject_nick, subject_time, salt) VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (service, name) DO UPDATE SET options = excluded.options, subject = excluded.subject,
                subject_nick = excluded.subject_nick, subject_time = excluded.subject_time, salt = excluded.salt
            """,
            Self.roomBinds(room.jid) + [.text(MUCOptionsCoding.encode(room.options)), .text(room.subject), room.subjectNick.map { .text($0) } ?? .null,
                                        room.subjectTime.map { .integer($0) } ?? .null, .text(room.salt)])
    }

    private static func insertAffiliation(_ db: SQLiteHandle, room: JID, user: JID, _ record: MUCAffiliationRecord) throws {
        try db.query(
            """
            INSERT INTO muc_affiliations (service, name, jid, affiliation, nick, reason) VALUES (?, ?, ?, ?, ?, ?)
            ON CONFLICT (service, name, jid) DO UPDATE SET affiliation = excluded.affiliation, nick = excluded.nick, reason = excluded.reason
            """,
            Self.roomBinds(room) + [.text(user.description), .text(record.affiliation.rawValue), record.nick.map { .text($0) } ?? .null,
                                    record.reason.map { .text($0) } ?? .null])
    }
}
