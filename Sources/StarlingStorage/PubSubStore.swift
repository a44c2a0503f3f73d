import Foundation
import StarlingAPI

/// How a node is configured (XEP-0060 §16.4's `pubsub#node_config` fields that we honour).
public struct PubSubNodeConfig: Sendable, Equatable, Codable {
    /// `open`, `presence`, `roster` or `whitelist`.
    public var accessModel: String = "presence"
    /// `publishers` (the owner) or `open`.
    public var publishModel: String = "publishers"
    public var maxItems: Int = 1
    public var persistItems: Bool = true
    /// `never`, `on_sub` or `on_sub_and_presence`.
    public var sendLastPublishedItem: String = "on_sub_and_presence"
    public var notifyRetract: Bool = true
    public var notifyDelete: Bool = true
    public var deliverPayloads: Bool = true
    /// Roster groups whose members may read (the `roster` access model).
    public var rosterGroupsAllowed: [String] = []
    public var title: String?
    public var type: String?
    /// Bare JIDs affiliated as members or publishers (who may read under the `whitelist` model), and
    /// outcasts, by affiliation name.
    public var affiliations: [String: String] = [:]

    public init() {}

    enum CodingKeys: String, CodingKey {
        case accessModel, publishModel, maxItems, persistItems, sendLastPublishedItem, notifyRetract, notifyDelete, deliverPayloads,
             rosterGroupsAllowed, title, type, affiliations
    }

    /// Fields missing in what an older version stored keep their defaults.
    public init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = PubSubNodeConfig()
        accessModel = try container.decodeIfPresent(String.self, forKey: .accessModel) ?? defaults.accessModel
        publishModel = try container.decodeIfPresent(String.self, forKey: .publishModel) ?? defaults.publishModel
        maxItems = try container.decodeIfPresent(Int.self, forKey: .maxItems) ?? defaults.maxItems
        persistItems = try container.decodeIfPresent(Bool.self, forKey: .persistItems) ?? defaults.persistItems
        sendLastPublishedItem = try container.decodeIfPresent(String.self, forKey: .sendLastPublishedItem) ?? defaults.sendLastPublishedItem
        notifyRetract = try container.decodeIfPresent(Bool.self, forKey: .notifyRetract) ?? defaults.notifyRetract
        notifyDelete = try container.decodeIfPresent(Bool.self, forKey: .notifyDelete) ?? defaults.notifyDelete
        deliverPayloads = try container.decodeIfPresent(Bool.self, forKey: .deliverPayloads) ?? defaults.deliverPayloads
        rosterGroupsAllowed = try container.decodeIfPresent([String].self, forKey: .rosterGroupsAllowed) ?? []
        title = try container.decodeIfPresent(String.self, forKey: .title)
        type = try container.decodeIfPresent(String.self, forKey: .type)
        affiliations = try container.decodeIfPresent([String: String].self, forKey: .affiliations) ?? [:]
    }

    /// JSON, so fields added later need no migration.
    public func encoded() -> String {
        String(decoding: (try? JSONEncoder().encode(self)) ?? Data("{}".utf8), as: UTF8.self)
    }

    public static func decode(_ text: String, node: String) throws(StorageError) -> PubSubNodeConfig {
        do { return try JSONDecoder().decode(PubSubNodeConfig.self, from: Data(text.utf8)) } catch {
            throw .backend("pubsub node \(node): stored configuration is unreadable: \(error)")
        }
    }
}

/// A node of a PubSub service: an account's PEP service (its bare JID) or a service's domain.
public struct StoredPubSubNode: Sendable, Equatable {
    /// The account's bare JID, or the service's domain.
    public var service: JID
    public var name: String
    public var config: PubSubNodeConfig

    public init(service: JID, name: String, config: PubSubNodeConfig) {
        self.service = service
        self.name = name
        self.config = config
    }
}

/// One published item.
public struct StoredPubSubItem: Sendable, Equatable {
    public var id: String
    /// The publisher's bare JID.
    public var publisher: String
    /// The item's payload, serialized (empty for an item without one).
    public var payload: String
    /// Unix seconds.
    public var published: Int

    public init(id: String, publisher: String, payload: String, published: Int) {
        self.id = id
        self.publisher = publisher
        self.payload = payload
        self.published = published
    }
}

/// One entity's subscription to a node of a PubSub service.
public struct StoredPubSubSubscription: Sendable, Equatable {
    /// The subscribed JID (bare or full, as it subscribed).
    public var jid: String
    /// `subscribed`, or `pending` while the owner decides (the `authorize` access model).
    public var state: String

    public init(jid: String, state: String) {
        self.jid = jid
        self.state = state
    }
}

/// PubSub nodes and their items (XEP-0060, XEP-0163). Items keep publication order; publishing an id
/// again replaces that item and makes it the newest.
public protocol PubSubStore: Sendable {
    /// Every node of `service`, by name.
    func pubsubNodes(of service: JID) async throws(StorageError) -> [StoredPubSubNode]
    /// Creates the node or replaces its configuration (items stay).
    func savePubSubNode(_ node: StoredPubSubNode) async throws(StorageError)
    /// Removes the node, its items and its subscriptions.
    func deletePubSubNode(_ name: String, of service: JID) async throws(StorageError)
    /// The node's items, newest first: those named by `ids` (in any order), or the newest `limit`.
    func pubsubItems(of node: String, service: JID, ids: [String]?, limit: Int?) async throws(StorageError) -> [StoredPubSubItem]
    /// Stores the item as the newest and keeps only the newest `keep` of the node.
    func publishPubSubItem(_ item: StoredPubSubItem, to node: String, service: JID, keep: Int) async throws(StorageError)
    /// Removes one item; false when it did not exist.
    func retractPubSubItem(_ id: String, from node: String, service: JID) async throws(StorageError) -> Bool
    /// Removes every item of the node.
    func purgePubSubNode(_ name: String, of service: JID) async throws(StorageError)
    /// Every subscription to the nodes of `service`, by node name (PEP services have none: contacts
    /// follow through presence).
    func pubsubSubscriptions(of service: JID) async throws(StorageError) -> [String: [StoredPubSubSubscription]]
    /// Records a subscription, or removes it when `state` is nil.
    func setPubSubSubscription(_ jid: String, state: String?, node: String, service: JID) async throws(StorageError)
}
