import PostgresNIO
import StarlingAPI
import StarlingStorage

extension PostgresStore: PushStore {
    public func pushRegistrations(of user: JID) async throws(StorageError) -> [PushRegistration] {
        let (host, username) = Self.key(user)
        return try await run { [client, logger] in
            var registrations: [PushRegistration] = []
            for try await (service, node, options) in try await client.query(
                "SELECT service, node, publish_options FROM push_registrations WHERE host = \(host) AND username = \(username) ORDER BY seq",
                logger: logger
            ).decode((String, String, String?).self) {
                guard let service = JID(service) else { continue }
                registrations.append(PushRegistration(service: service, node: node, publishOptions: options))
            }
            return registrations
        }
    }

    public func enablePush(_ registration: PushRegistration, for user: JID, limit: Int) async throws(StorageError) -> Bool {
        let (host, username) = Self.key(user)
        let service = registration.service.description, node = registration.node, options = registration.publishOptions
        return try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                // One account's enables one at a time, so the limit holds.
                try await connection.query("SELECT pg_advisory_xact_lock(hashtext(\("push/" + host + "/" + username)))", logger: logger)
                let updated = try await connection.query(
                    """
                    UPDATE push_registrations SET publish_options = \(options)
                    WHERE host = \(host) AND username = \(username) AND service = \(service) AND node = \(node) RETURNING 1
                    """, logger: logger).collect()
                if !updated.isEmpty { return true }
                var count = 0
                for try await n in try await connection.query(
                    "SELECT COUNT(*)::BIGINT FROM push_registrations WHERE host = \(host) AND username = \(username)", logger: logger).decode(Int.self) { count = n }
                guard count < limit else { return false }
                try await connection.query(
                    "INSERT INTO push_registrations (host, username, service, node, publish_options) VALUES (\(host), \(username), \(service), \(node), \(options))",
                    logger: logger)
                return true
            }
        }
    }

    @discardableResult
    public func disablePush(service: JID, node: String?, for user: JID) async throws(StorageError) -> Int {
        let (host, username) = Self.key(user)
        let service = service.description
        return try await run { [client, logger] in
            let rows: PostgresRowSequence
            if let node {
                rows = try await client.query(
                    "DELETE FROM push_registrations WHERE host = \(host) AND username = \(username) AND service = \(service) AND node = \(node) RETURNING 1",
                    logger: logger)
            } else {
                rows = try await client.query(
                    "DELETE FROM push_registrations WHERE host = \(host) AND username = \(username) AND service = \(service) RETURNING 1", logger: logger)
            }
            return try await rows.collect().count
        }
    }
}
