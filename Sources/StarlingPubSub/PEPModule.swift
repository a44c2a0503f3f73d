import Foundation
import StarlingAPI
import StarlingStorage
import Synchronization

/// XEP-0163 Personal Eventing via PubSub: every account is a PubSub service of its own. Contacts who see
/// the account's presence and say `<node>+notify` in their entity capabilities (XEP-0115) get what it
/// publishes, and the newest item of each such node when they come online. Avatars (XEP-0084),
/// bookmarks (XEP-0402), nicknames (XEP-0172) and OMEMO keys all live here.
public final class PEPModule: ServerModule {
    static let clusterNamespace = "urn:starling:pep"
    public static let descriptor = ModuleDescriptor(
        name: "pep", summary: "Personal eventing: avatars, bookmarks, nicknames and OMEMO keys on every account.",
        xeps: ["XEP-0163", "XEP-0060", "XEP-0115", "XEP-0084", "XEP-0398", "XEP-0402", "XEP-0172", "XEP-0223"],
        dependencies: ["roster"],
        options: [
            ModuleOptionSpec("max_nodes", .integer(1...10_000), default: .integer(100), doc: "Nodes per account."),
            ModuleOptionSpec("max_items", .integer(1...10_000), default: .integer(256),
                             doc: "Items a node keeps at most (what pubsub#max_items 'max' means)."),
            ModuleOptionSpec("max_item_size", .integer(256...16_777_216), default: .integer(262_144), doc: "Largest item payload in bytes."),
            ModuleOptionSpec("cached_accounts", .integer(100...10_000_000), default: .integer(10_000),
                             doc: "Accounts whose nodes are kept in memory (for the newest items sent at presence)."),
        ]
    )

    /// What the account's disco#info lists for PEP (XEP-0060 §10, XEP-0163 §4).
    static let features = [
        "", "#access-open", "#access-presence", "#access-roster", "#access-whitelist", "#auto-create", "#config-node", "#create-and-configure",
        "#create-nodes", "#delete-items", "#delete-nodes", "#filtered-notifications", "#item-ids", "#last-published", "#manage-affiliations",
        "#persistent-items", "#presence-notifications", "#publish", "#publish-options", "#purge-nodes", "#retract-items", "#retrieve-affiliations",
        "#retrieve-default", "#retrieve-items", "#retrieve-subscriptions",
    ].map { PubSubNamespace.pubsub + $0 }

    private let host: any ModuleHost
    private let rosters: any RosterStore
    private let caps = EntityCaps()
    private let engine: PubSubEngine
    /// Per local resource, the capabilities it was last sent items for (so a status change sends nothing).
    private let served = Mutex<[JID: String]>([:])
    /// Contacts at other domains: the available resources whose presence reached our accounts.
    private let remote = RemoteResources()

    public init(host: any ModuleHost) throws {
        self.host = host
        guard let store = host.service((any PubSubStore).self), let rosters = host.service((any RosterStore).self),
              let vcards = host.service((any VCardStore).self) else {
            throw ModuleStartError("no PubSub, roster or vCard storage available")
        }
        self.rosters = rosters
        let avatars = AvatarConversion(vcards: vcards, host: host)
        let rules = PubSubRules(subscriptions: false, maxNodes: host.options.integer("max_nodes"), maxItems: host.options.integer("max_items"),
                                maxItemSize: host.options.integer("max_item_size"), mayCreate: { requester, service in requester == service }, admins: [])
        let caps = self.caps
        let remote = self.remote
        engine = PubSubEngine(host: host, store: store, rosters: rosters, rules: rules, cachedServices: host.options.integer("cached_accounts"),
                              clusterNamespace: Self.clusterNamespace, published: { engine, owner, node, item in
                                  guard node == AvatarConversion.metadataNode else { return }
                                  await avatars.published(item, owner: owner, engine: engine)
                              }) { owner, node, cached in
            await Self.recipients(owner: owner, node: node, config: cached.config, host: host, rosters: rosters, caps: caps, remote: remote)
        }
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.identity(category: "pubsub", type: "pep", for: .account)
        for feature in Self.features + [AvatarConversion.feature] { registrar.feature(feature, for: .account) }
        for type in [IQType.get, .set] {
            for namespace in [PubSubNamespace.pubsub, PubSubNamespace.owner] {
                registrar.iq(type, "pubsub", namespace, target: .account, fromRemote: true) { [engine] request in
                    try await engine.handle(request, type: type, service: request.to.bare)
                }
            }
        }
        registrar.discoItems(for: .account) { [engine] request in
            try await engine.discoItems(node: request.payload[attribute: "node"], for: request.from.bare, service: request.to.bare)
        }
        // Our disco#info queries' answers (from local clients, and from contacts at other domains), before
        // anything else routes them.
        let takeAnswer: @Sendable (StanzaEvent) -> HookResult = { [host, caps] event in
            let stanza = event.stanza
            guard stanza.name == "iq", let origin = event.origin, stanza[attribute: "to"] == host.domain,
                  stanza[attribute: "type"] == "result" || stanza[attribute: "type"] == "error", caps.answer(stanza, from: origin) else { return .pass }
            return .handled
        }
        registrar.hook(.stanzaFromClient, priority: 1100, takeAnswer)
        registrar.hook(.stanzaFromRemote, priority: 1100, takeAnswer)
        // Available presence with capabilities: learn them, then send the newest items it wants.
        registrar.hook(.stanzaFromClient, priority: 150) { [self] event in
            let stanza = event.stanza
            guard stanza.name == "presence", stanza[attribute: "type"] == nil, stanza[attribute: "to"] == nil, let origin = event.origin,
                  let advertised = EntityCaps.Advertised(stanza) else { return .pass }
            Task { await presenceArrived(origin, advertised) }
            return .pass
        }
        // Contacts at other domains (over s2s): their presence, with capabilities, as it reaches our accounts.
        registrar.hook(.stanzaFromRemote, priority: 150) { [self] event in
            let stanza = event.stanza
            guard stanza.name == "presence", let contact = event.origin, contact.resourcepart != nil,
                  let owner = event.recipient?.bare, owner.localpart != nil else { return .pass }
            switch stanza[attribute: "type"] {
            case nil:
                guard let advertised = EntityCaps.Advertised(stanza), remote.available(contact, presence: stanza) else { return .pass }
                Task { await remotePresenceArrived(contact, advertised, owner: owner) }
            case "unavailable":
                remote.unavailable(contact)
                caps.forget(contact)
            default:
                break
            }
            return .pass
        }
        // What is kept per session here goes when it ends, or when it moves to another node of the cluster.
        let forgetSession: @Sendable (SessionEvent) -> HookResult = { [self] event in
            served.withLock { _ = $0.removeValue(forKey: event.jid) }
            caps.forget(event.jid)
            return .pass
        }
        registrar.hook(.sessionClosed, forgetSession)
        registrar.hook(.sessionMoved, forgetSession)
        // A contact who may now see the account's presence is, for PEP, newly subscribed: its resources
        // that want a node get the newest item (XEP-0163 §4.3).
        registrar.hook(.rosterChanged) { [self] event in
            guard event.subscription == "from" || event.subscription == "both", event.contact.localpart != nil,
                  host.isLocal(event.contact.domainpart) else { return .pass }
            let owner = event.user.bare, contact = event.contact.bare
            Task {
                for resource in host.resources(of: contact) where resource.available {
                    guard let features = caps.features(of: resource.jid, presence: resource.presence) else { continue }
                    let interests = Self.interests(features)
                    guard !interests.isEmpty else { continue }
                    do { try await sendNewestItems(of: owner, to: resource.jid, interests: interests) } catch {
                        host.log(.warning, "PEP: could not send the newest items of \(owner) to \(resource.jid): \(error)")
                    }
                }
            }
            return .pass
        }
        // A new account under a deleted one's name starts without its nodes.
        registrar.hook(.userRegistered) { [engine] event in
            engine.forget(event.jid.bare)
            return .pass
        }
        registrar.hook(.clusterMessage) { [engine, caps] event in
            let message = event.message
            if engine.clusterMessage(message) { return .handled }
            guard message.namespace == Self.clusterNamespace, message.name == "caps", let key = message[attribute: "key"] else { return .pass }
            caps.learn(key: key, features: Set(message.elements.compactMap { $0[attribute: "var"] }))
            return .handled
        }
    }

    /// Every available resource that may read the node and wants it (`+notify`): the owner's own, and
    /// those of contacts who see the owner's presence.
    private static func recipients(owner: JID, node: String, config: PubSubNodeConfig, host: any ModuleHost, rosters: any RosterStore,
                                   caps: EntityCaps, remote: RemoteResources) async -> [JID] {
        let wanted = node + "+notify"
        var recipients: [JID] = []
        func add(_ resources: [ResourceInfo]) {
            for resource in resources where resource.available && caps.features(of: resource.jid, presence: resource.presence)?.contains(wanted) == true {
                recipients.append(resource.jid)
            }
        }
        add(host.resources(of: owner))
        do {
            for item in try await rosters.roster(of: owner).items
            where item.subscription.contactReceivesPresence && item.jid.localpart != nil && mayRead(item, config: config) {
                add(host.isLocal(item.jid.domainpart) ? host.resources(of: item.jid) : remote.resources(of: item.jid))
            }
        } catch {
            host.log(.warning, "PEP notifications for \(owner) went to its own resources only: the roster could not be read: \(error)")
        }
        return recipients
    }

    /// Whether a contact (who sees the owner's presence) may read a node of the owner's, from the roster item alone.
    private static func mayRead(_ item: RosterItem, config: PubSubNodeConfig) -> Bool {
        let affiliation = config.affiliations[item.jid.description]
        if affiliation == "outcast" { return false }
        if affiliation == "member" || affiliation == "publisher" { return true }
        switch config.accessModel {
        case "open", "presence": return true
        case "roster": return !Set(config.rosterGroupsAllowed).isDisjoint(with: item.groups)
        default: return false
        }
    }

    private func presenceArrived(_ resource: JID, _ advertised: EntityCaps.Advertised) async {
        guard let (features, verifiedKey) = await caps.resolve(resource, caps: advertised, from: host.domain, send: { host.route($0) }) else { return }
        if let verifiedKey {
            var message = XMLElement(name: "caps", namespace: Self.clusterNamespace, attributes: ["key": verifiedKey])
            for feature in features.sorted() { message.append(XMLElement(name: "feature", namespace: Self.clusterNamespace, attributes: ["var": feature])) }
            host.broadcastToCluster(message)
        }
        let key = EntityCaps.key(advertised)
        guard served.withLock({ served in
            defer { served[resource] = key }
            return served[resource] != key
        }) else { return }
        let interests = Self.interests(features)
        guard !interests.isEmpty else { return }
        do {
            try await sendNewestItems(of: resource.bare, to: resource, interests: interests)
            for item in try await rosters.roster(of: resource.bare).items
            where item.subscription.userReceivesPresence && item.jid.localpart != nil && host.isLocal(item.jid.domainpart) {
                try await sendNewestItems(of: item.jid, to: resource, interests: interests)
            }
        } catch {
            host.log(.warning, "PEP: could not send the newest items to \(resource): \(error)")
        }
    }

    /// A contact at another domain came online (or changed capabilities) for `owner`: once its features
    /// are known, it gets the newest items of `owner`'s nodes it wants, if it may see `owner`'s presence.
    private func remotePresenceArrived(_ contact: JID, _ advertised: EntityCaps.Advertised, owner: JID) async {
        guard let (features, _) = await caps.resolve(contact, caps: advertised, from: host.domain, send: { host.route($0) }) else { return }
        let interests = Self.interests(features)
        guard !interests.isEmpty else { return }
        do {
            guard try await rosters.item(of: owner, contact: contact.bare)?.subscription.contactReceivesPresence == true else { return }
            try await sendNewestItems(of: owner, to: contact, interests: interests)
        } catch {
            host.log(.warning, "PEP: could not send the newest items of \(owner) to \(contact): \(error)")
        }
    }

    /// The nodes a client's features say `+notify` for.
    private static func interests(_ features: Set<String>) -> Set<String> {
        Set(features.filter { $0.hasSuffix("+notify") }.map { String($0.dropLast("+notify".count)) })
    }

    private func sendNewestItems(of owner: JID, to resource: JID, interests: Set<String>) async throws {
        let relevant = try await engine.nodes(of: owner).filter {
            interests.contains($0.key) && $0.value.last != nil && $0.value.config.sendLastPublishedItem == "on_sub_and_presence"
        }
        for (name, node) in relevant.sorted(by: { $0.key < $1.key }) where try await engine.refusal(of: resource.bare, service: owner, node: node) == nil {
            guard let last = try await engine.newest(of: node, name: name, service: owner) else { continue }
            engine.sendItems(node: name, [last], payloads: node.config.deliverPayloads, from: owner, to: resource)
        }
    }
}

/// The available resources of contacts at other domains, as their presence reached this host's
/// accounts: PEP notifications go to those that want them. Bounded: past `limit` resources, new ones
/// are not tracked (they still get items they ask for).
final class RemoteResources: Sendable {
    private struct Table {
        var byContact: [JID: [JID: XMLElement]] = [:]
        var count = 0
    }
    private let table = Mutex(Table())
    let limit: Int

    init(limit: Int = 100_000) { self.limit = limit }

    /// Records the presence; false when the table is full and it was not recorded.
    func available(_ resource: JID, presence: XMLElement) -> Bool {
        table.withLock { table in
            if table.byContact[resource.bare]?[resource] == nil {
                guard table.count < limit else { return false }
                table.count += 1
            }
            table.byContact[resource.bare, default: [:]][resource] = presence
            return true
        }
    }

    func unavailable(_ resource: JID) {
        table.withLock { table in
            guard table.byContact[resource.bare]?.removeValue(forKey: resource) != nil else { return }
            if table.byContact[resource.bare]?.isEmpty == true { table.byContact[resource.bare] = nil }
            table.count -= 1
        }
    }

    func resources(of contact: JID) -> [ResourceInfo] {
        table.withLock { table in
            (table.byContact[contact.bare] ?? [:]).map { ResourceInfo(jid: $0.key, available: true, priority: 0, isLocal: false, presence: $0.value) }
        }
    }
}
