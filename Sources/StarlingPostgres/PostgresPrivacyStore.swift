import PostgresNIO
import StarlingAPI
import StarlingStorage

extension PostgresStore: PrivacyStore {
    public func privacyLists(of user: JID) async throws(StorageError) -> (lists: [String: [PrivacyRule]], defaultList: String?) {
        let (host, username) = Self.key(user)
        let (rows, defaultList) = try await run { [client, logger] in
            var rows: [(String, String)] = []
            for try await row in try await client.query(
                "SELECT name, rules FROM privacy_lists WHERE host = \(host) AND username = \(username)", logger: logger).decode((String, String).self) {
                rows.append(row)
            }
            var defaultList: String?
            for try await name in try await client.query(
                "SELECT name FROM privacy_defaults WHERE host = \(host) AND username = \(username)", logger: logger).decode(String.self) {
                defaultList = name
            }
            return (rows, defaultList)
        }
        var lists: [String: [PrivacyRule]] = [:]
        for (name, rules) in rows { lists[name] = try PrivacyRulesCoding.decode(rules, list: name) }
        return (lists, defaultList)
    }

    public func setPrivacyList(_ name: String, rules: [PrivacyRule]?, of user: JID) async throws(StorageError) {
        let (host, username) = Self.key(user)
        let encoded = rules.map(PrivacyRulesCoding.encode)
        try await run { [client, logger] in
            try await client.withTransaction(logger: logger) { connection in
                if let encoded {
                    try await connection.query(
                        """
                        INSERT INTO privacy_lists (host, username, name, rules) VALUES (\(host), \(username), \(name), \(encoded))
                        ON CONFLICT (host, username, name) DO UPDATE SET rules = EXCLUDED.rules
                        """, logger: logger)
                } else {
                    try await connection.query("DELETE FROM privacy_lists WHERE host = \(host) AND username = \(username) AND name = \(name)", logger: logger)
                    try await connection.query("DELETE FROM privacy_defaults WHERE host = \(host) AND username = \(username) AND name = \(name)", logger: logger)
                }
            }
        }
    }

    public func setDefaultPrivacyList(_ name: String?, of user: JID) async throws(StorageError) {
        let (host, username) = Self.key(user)
        try await run { [client, logger] in
            if let name {
                try await client.query(
                    """
                    INSERT INTO privacy_defaults (host, username, name) VALUES (\(host), \(username), \(name))
                    ON CONFLICT (host, username) DO UPDATE SET name = EXCLUDED.name
                    """, logger: logger)
            } else {
                try await client.query("DELETE FROM privacy_defaults WHERE host = \(host) AND username = \(username)", logger: logger)
            }
        }
    }
}
