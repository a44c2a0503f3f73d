import SQLiteNIO
import StarlingAPI
import StarlingStorage

extension SQLiteStore: PrivacyStore {
    public func privacyLists(of user: JID) async throws(StorageError) -> (lists: [String: [PrivacyRule]], defaultList: String?) {
        let (rows, defaultList) = try await run { db in
            let rows = try db.query("SELECT name, rules FROM privacy_lists WHERE host = ? AND username = ?", Self.userBinds(user))
            let defaultList = try db.query("SELECT name FROM privacy_defaults WHERE host = ? AND username = ?", Self.userBinds(user))
                .first?.column("name")?.string
            return (rows, defaultList)
        }
        var lists: [String: [PrivacyRule]] = [:]
        for row in rows {
            guard let name = row.column("name")?.string else { continue }
            lists[name] = try PrivacyRulesCoding.decode(row.column("rules")?.string ?? "[]", list: name)
        }
        return (lists, defaultList)
    }

    public func setPrivacyList(_ name: String, rules: [PrivacyRule]?, of user: JID) async throws(StorageError) {
        try await run { db in
            try db.transaction {
                if let rules {
                    try db.query(
                        "INSERT INTO privacy_lists (host, username, name, rules) VALUES (?, ?, ?, ?) ON CONFLICT (host, username, name) DO UPDATE SET rules = excluded.rules",
                        Self.userBinds(user) + [.text(name), .text(PrivacyRulesCoding.encode(rules))])
                } else {
                    try db.query("DELETE FROM privacy_lists WHERE host = ? AND username = ? AND name = ?", Self.userBinds(user) + [.text(name)])
                    try db.query("DELETE FROM privacy_defaults WHERE host = ? AND username = ? AND name = ?", Self.userBinds(user) + [.text(name)])
                }
            }
        }
    }

    public func setDefaultPrivacyList(_ name: String?, of user: JID) async throws(StorageError) {
        try await run { db in
            if let name {
                try db.query(
                    "INSERT INTO privacy_defaults (host, username, name) VALUES (?, ?, ?) ON CONFLICT (host, username) DO UPDATE SET name = excluded.name",
                    Self.userBinds(user) + [.text(name)])
            } else {
                try db.query("DELETE FROM privacy_defaults WHERE host = ? AND username = ?", Self.userBinds(user))
            }
        }
    }
}
