import PostgresNIO
import StarlingAPI
import StarlingStorage

extension PostgresStore: MUCStore {
    public func mucRooms(service: String) async throws(StorageError) -> [StoredMUCRoom] {
        let (roomRows, affiliationRows) = try await run { [client, logger] in
            var rooms: [(String, String, String, String?, Int?, String)] = []
            for try await row in try await client.query(
                "SELECT name, options, subject, subject_nick, subject_time, salt FROM muc_rooms WHERE service = \(service)", logger: logger
            ).decode((String, String, String, String?, Int?, String).self) { rooms.append(row) }
            var affiliations: [(String, String, String, String?, String?)] = []
            for try await row in try await client.query(
                "SELECT name, jid, affiliation, nick, reason FROM muc_affiliations WHERE service = \(service)", logger: logger
            ).decode((String, String, String, String?, String?).self) { affiliations.append(row) }
            return (rooms, affiliations)
        }
        var rooms: [String: StoredMUCRoom] = [:]
        for (name, options, subject, subjectNick, subjectTime, salt) in roomRows {
            guard let jid = JID("\(name)@\(service)") else { continue }
            rooms[name] = StoredMUCRoom(jid: jid, options: try MUCOptionsCoding.decode(options, room: jid.description), subject: subject,
                                        subjectNick: subjectNick, subjectTime: subjectTime, salt: salt)
        }
        for (name, user, affiliation, nick, reason) in affiliationRows {
            guard let user = JID(user), let affiliation = MUCAffiliation(rawValue: affiliation) else { continue }
            rooms[name]?.affiliations[user] = MUCAffiliationRecord(affiliation: affiliation, nick: nick, reason: reason)
        }
        return rooms.keys.sorted().map { rooms[$0]! }
    }

    public func saveMUCRoom(_ room: StoredMUCRoom) async throws(StorageError) {
        try await run { [client, logger] in
            try await Self.upsertRoom(room, on: client, logger: logger)
        }
    }

    public func replaceMUCRoom(_ room: StoredMUCRoom) async throws(StorageError) {
        let (service, name) = Self.roomKey(room.jid)
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                try await Self.upsertRoom(room, on: connection, logger: logger)
                try await connection.query("DELETE FROM muc_affiliations WHERE service = \(service) AND name = \(name)", logger: logger)
                for (user, record) in room.affiliations where record.affiliation != .none {
                    try await Self.upsertAffiliation(room: room.jid, user: user, record, on: connection, logger: logger)
                }
            }
        }
    }

    public func setMUCAffiliation(room: JID, user: JID, _ record: MUCAffiliationRecord) async throws(StorageError) {
        let (service, name) = Self.roomKey(room)
        let jid = user.description
        try await run { [client, logger] in
            if record.affiliation == .none {
                try await client.query("DELETE FROM muc_affiliations WHERE service = \(service) AND name = \(name) AND jid = \(jid)", logger: logger)
            } else {
                try await Self.upsertAffiliation(room: room, user: user, record, on: client, logger: logger)
            }
        }
    }

    public func deleteMUCRoom(_ room: JID) async throws(StorageError) {
        let (service, name) = Self.roomKey(room)
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                try await connection.query("DELETE FROM muc_affiliations WHERE service = \(service) AND name = \(name)", logger: logger)
                try await connection.query("DELETE FROM muc_rooms WHERE service = \(service) AND name = \(name)", logger: logger)
            }
        }
    }

    private static func roomKey(_ room: JID) -> (String, String) { (room.domainpart, room.localpart ?? "") }

    private static func upsertRoom(_ room: StoredMUCRoom, on runner: some PostgresQueryRunner, logger: Logger) async throws {
        let (service, name) = roomKey(room.jid)
        let options = MUCOptionsCoding.encode(room.options)
        try await runner.run(
            """
            INSERT INTO muc_rooms (service, name, options, subject, subject_nick, subject_time, salt)
            VALUES (\(service), \(name), \(options), \(room.subject), \(room.subjectNick), \(room.subjectTime), \(room.salt))
            ON CONFLICT (service, name) DO UPDATE SET options = EXCLUDED.options, subject = EXCLUDED.subject,
                subject_nick = EXCLUDED.subject_nick, subject_time = EXCLUDED.subject_time, salt = EXCLUDED.salt
            """, logger: logger)
    }

    private static func upsertAffiliation(room: JID, user: JID, _ record: MUCAffiliationRecord, on runner: some PostgresQueryRunner,
                                          logger: Logger) async throws {
        let (service, name) = roomKey(room)
        try await runner.run(
            """
            INSERT INTO muc_affiliations (service, name, jid, affiliation, nick, reason)
            VALUES (\(service), \(name), \(user.description), \(record.affiliation.rawValue), \(record.nick), \(record.reason))
            ON CONFLICT (service, name, jid) DO UPDATE SET affiliation = EXCLUDED.affiliation, nick = EXCLUDED.nick, reason = EXCLUDED.reason
            """, logger: logger)
    }
}

/// Runs a query on a pooled client or on one connection (inside a transaction).
protocol PostgresQueryRunner {
    func run(_ query: PostgresQuery, logger: Logger) async throws
}

extension PostgresClient: PostgresQueryRunner {
    func run(_ query: PostgresQuery, logger: Logger) async throws { try await self.query(query, logger: logger) }
}

extension PostgresConnection: PostgresQueryRunner {
    func run(_ query: PostgresQuery, logger: Logger) async throws { try await self.query(query, logger: logger) }
}
