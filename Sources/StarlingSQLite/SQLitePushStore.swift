import SQLiteNIO
import StarlingAPI
import StarlingStorage

extension SQLiteStore: PushStore {
    public func pushRegistrations(of user: JID) async throws(StorageError) -> [PushRegistration] {
        try await run { db in
            try db.query(
                "SELECT service, node, publish_options FROM push_registrations WHERE host = ? AND username = ? ORDER BY seq", Self.userBinds(user)
            ).compactMap { row -> PushRegistration? in
                guard let service = row.column("service")?.string.flatMap(JID.init), let node = row.column("node")?.string else { return nil }
                return PushRegistration(service: service, node: node, publishOptions: row.column("publish_options")?.string)
            }
        }
    }

    public func enablePush(_ registration: PushRegistration, for user: JID, limit: Int) async throws(StorageError) -> Bool {
        try await run { db in
            try db.transaction {
                let binds = Self.userBinds(user) + [.text(registration.service.description), .text(registration.node)]
                let options: SQLiteData = registration.publishOptions.map { .text($0) } ?? .null
                let updated = try db.query(
                    "UPDATE push_registrations SET publish_options = ? WHERE host = ? AND username = ? AND service = ? AND node = ? RETURNING 1",
                    [options] + binds)
                if !updated.isEmpty { return true }
                let count = try db.query(
                    "SELECT COUNT(*) AS n FROM push_registrations WHERE host = ? AND username = ?", Self.userBinds(user)
                ).first?.column("n")?.integer ?? 0
                guard count < limit else { return false }
                try db.query(
                    "INSERT INTO push_registrations (host, username, service, node, publish_options) VALUES (?, ?, ?, ?, ?)", binds + [options])
                return true
            }
        }
    }

    @discardableResult
    public func disablePush(service: JID, node: String?, for user: JID) async throws(StorageError) -> Int {
        try await run { db in
            var binds = Self.userBinds(user) + [.text(service.description)]
            var sql = "DELETE FROM push_registrations WHERE host = ? AND username = ? AND service = ?"
            if let node {
                sql += " AND node = ?"
                binds.append(.text(node))
            }
            return try db.query(sql + " RETURNING 1", binds).count
        }
    }
}
