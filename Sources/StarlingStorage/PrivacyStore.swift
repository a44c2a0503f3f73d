import Foundation
import StarlingAPI

/// One rule of a XEP-0016 privacy list.
public struct PrivacyRule: Sendable, Equatable, Codable {
    /// `jid`, `group`, `subscription`, or nil for the fall-through rule that matches everyone.
    public var type: String?
    public var value: String?
    /// `allow` or `deny`.
    public var action: String
    public var order: Int
    /// Of `message`, `iq`, `presence-in`, `presence-out`; empty means every kind, both ways.
    public var stanzas: [String]

    public init(type: String?, value: String?, action: String, order: Int, stanzas: [String] = []) {
        self.type = type
        self.value = value
        self.action = action
        self.order = order
        self.stanzas = stanzas
    }
}

/// XEP-0016 privacy lists, per account, and which one is the default.
public protocol PrivacyStore: Sendable {
    /// Every list of the account by name, and the default list's name.
    func privacyLists(of user: JID) async throws(StorageError) -> (lists: [String: [PrivacyRule]], defaultList: String?)
    /// Creates or replaces a list; nil removes it (and its being the default).
    func setPrivacyList(_ name: String, rules: [PrivacyRule]?, of user: JID) async throws(StorageError)
    /// Makes a stored list the default, or none.
    func setDefaultPrivacyList(_ name: String?, of user: JID) async throws(StorageError)
}

/// How both backends store a list's rules: JSON, so fields added later need no migration.
public enum PrivacyRulesCoding {
    public static func encode(_ rules: [PrivacyRule]) -> String {
        String(decoding: (try? JSONEncoder().encode(rules)) ?? Data("[]".utf8), as: UTF8.self)
    }

    public static func decode(_ text: String, list: String) throws(StorageError) -> [PrivacyRule] {
        do { return try JSONDecoder().decode([PrivacyRule].self, from: Data(text.utf8)) } catch {
            throw .backend("privacy list \(list): stored rules are unreadable: \(error)")
        }
    }
}
