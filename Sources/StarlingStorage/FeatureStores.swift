import StarlingAPI

/// XEP-0160 offline messages: stored in arrival order, handed out once.
public protocol OfflineStore: Sendable {
    /// Appends a serialized message unless the account already holds `limit`; returns false when full.
    func storeOffline(_ stanza: String, for user: JID, limit: Int) async throws(StorageError) -> Bool
    /// Returns and deletes every stored message, oldest first.
    func takeOffline(for user: JID) async throws(StorageError) -> [String]
    func offlineCount(for user: JID) async throws(StorageError) -> Int
    /// Every stored message, oldest first, without removing them (for export).
    func offlineMessages(for user: JID) async throws(StorageError) -> [String]
}

/// XEP-0191 blocklists: bare JIDs, full JIDs or domains.
public protocol BlocklistStore: Sendable {
    func blocklist(of user: JID) async throws(StorageError) -> [JID]
    func block(_ items: [JID], for user: JID) async throws(StorageError)
    /// Unblocks `items`, or everything when `items` is empty.
    func unblock(_ items: [JID], for user: JID) async throws(StorageError)
}

/// XEP-0049 private XML storage: one serialized element per (account, element name, namespace).
public protocol PrivateXMLStore: Sendable {
    func privateXML(of user: JID, name: String, namespace: String) async throws(StorageError) -> String?
    func setPrivateXML(_ xml: String, of user: JID, name: String, namespace: String) async throws(StorageError)
    /// Every stored document of the account (for export).
    func allPrivateXML(of user: JID) async throws(StorageError) -> [String]
}

/// XEP-0054 vCards, with the SHA-1 of the photo for XEP-0153.
public protocol VCardStore: Sendable {
    func vCard(of user: JID) async throws(StorageError) -> (xml: String, photoHash: String?)?
    func setVCard(_ xml: String, photoHash: String?, of user: JID) async throws(StorageError)
}

/// XEP-0012: when an account's last session ended, and with which status text.
public protocol LastActivityStore: Sendable {
    func lastActivity(of user: JID) async throws(StorageError) -> (seconds: Int, status: String)?
    func setLastActivity(of user: JID, at seconds: Int, status: String) async throws(StorageError)
}

/// Everything a backend stores: the server opens one of these.
public protocol StarlingStore: AccountStore, RosterStore, OfflineStore, BlocklistStore, PrivateXMLStore, VCardStore, LastActivityStore, MUCStore,
                               ArchiveStore, PubSubStore, PrivacyStore, FASTTokenStore, PushStore {
    /// Releases connections and files.
    func close() async
}

/// Table names both backends use, so that "everything an account owns" is listed once.
public enum StorageTables {
    /// Every table keyed by (host, username), dependents before `accounts`.
    public static let perUser = [
        "roster_items", "roster_pending", "roster_versions", "offline_messages", "blocklist", "private_xml", "vcards",
        "last_activity", "archive_messages", "archive_prefs", "pubsub_items", "pubsub_subscriptions", "pubsub_nodes", "privacy_lists", "privacy_defaults", "fast_tokens", "push_registrations", "scram_credentials", "accounts",
    ]
}
