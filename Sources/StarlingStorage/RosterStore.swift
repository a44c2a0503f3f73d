import StarlingAPI

/// The subscription half of a roster item (RFC 6121 §2.1.2.5).
public enum Subscription: String, Sendable, Codable {
    case none, to, from, both

    /// The contact sees the user's presence.
    public var contactReceivesPresence: Bool { self == .from || self == .both }
    /// The user sees the contact's presence.
    public var userReceivesPresence: Bool { self == .to || self == .both }
}

/// One contact in a user's roster, with the subscription state RFC 6121 Appendix A tracks.
public struct RosterItem: Sendable, Equatable {
    /// The contact's bare JID.
    public var jid: JID
    public var name: String?
    public var groups: [String]
    public var subscription: Subscription
    /// The user asked for the contact's presence and has no answer yet ("pending out").
    public var askSubscribe: Bool
    /// The user approved the contact's subscription before it was asked for (RFC 6121 §3.4).
    public var preApproved: Bool

    public init(jid: JID, name: String? = nil, groups: [String] = [], subscription: Subscription = .none, askSubscribe: Bool = false, preApproved: Bool = false) {
        self.jid = jid
        self.name = name
        self.groups = groups
        self.subscription = subscription
        self.askSubscribe = askSubscribe
        self.preApproved = preApproved
    }
}

/// Rosters and pending inbound subscription requests ("pending in"), per account.
/// Every change bumps the roster's version (XEP-0237 roster versioning).
public protocol RosterStore: Sendable {
    /// The whole roster and its version.
    func roster(of user: JID) async throws(StorageError) -> (version: Int, items: [RosterItem])
    func item(of user: JID, contact: JID) async throws(StorageError) -> RosterItem?
    /// Inserts or replaces the item; returns the new roster version.
    func put(_ item: RosterItem, for user: JID) async throws(StorageError) -> Int
    /// Removes the item if present; returns the new roster version.
    func remove(contact: JID, for user: JID) async throws(StorageError) -> Int
    /// Records that `contact` asked for `user`'s presence, keeping the request stanza.
    func addPendingSubscription(from contact: JID, to user: JID, stanza: String) async throws(StorageError)
    func removePendingSubscription(from contact: JID, to user: JID) async throws(StorageError)
    func pendingSubscriptions(to user: JID) async throws(StorageError) -> [(contact: JID, stanza: String)]
    /// Drops everything the account owns (account deletion).
    func removeAll(of user: JID) async throws(StorageError)
}
