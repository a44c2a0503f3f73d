import StarlingAPI

/// One XEP-0357 push registration: where notifications for the account go.
public struct PushRegistration: Sendable, Equatable {
    /// The XMPP Push Service (the app server's PubSub service).
    public var service: JID
    public var node: String
    /// The serialized publish-options form the client gave (an app server's secret, say), sent with every
    /// notification.
    public var publishOptions: String?

    public init(service: JID, node: String, publishOptions: String? = nil) {
        self.service = service
        self.node = node
        self.publishOptions = publishOptions
    }
}

/// XEP-0357 push registrations per account.
public protocol PushStore: Sendable {
    /// The account's registrations, in the order they were first enabled.
    func pushRegistrations(of user: JID) async throws(StorageError) -> [PushRegistration]
    /// Adds the registration, or replaces the publish options of the same service and node. Returns false
    /// (and stores nothing) when it is new and the account already has `limit`.
    func enablePush(_ registration: PushRegistration, for user: JID, limit: Int) async throws(StorageError) -> Bool
    /// Removes the service's registration for `node`, or all of the service's when `node` is nil; returns how many.
    @discardableResult
    func disablePush(service: JID, node: String?, for user: JID) async throws(StorageError) -> Int
}
