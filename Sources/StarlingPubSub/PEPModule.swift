import Foundation
import StarlingAPI
import StarlingStorage
import StarlingXML
import Synchronization

/// XEP-0163 Personal Eventing via PubSub: every account is a PubSub service of its own. Contacts who see
/// the account's presence and say `<node>+notify` in their entity capabilities (XEP-0115) get what it
/// publishes, and the newest item of each such node when they come online. Avatars (XEP-0084),
/// bookmarks (XEP-0402), nicknames (XEP-0172) and OMEMO keys all live here.
public final class PEPModule: ServerModule {
    static let clusterNamespace = "urn:starling:pep"
    public static let descriptor = ModuleDescriptor(
        name: "pep", summary: "Personal eventing: avatars, bookmarks, nicknames and OMEMO keys on every account.",
        xeps: ["XEP-0163", "XEP-0060", "XEP-0115", "XEP-0084", "XEP-0402", "XEP-0172", "XEP-0223"],
        dependencies: ["roster"],
        options: [
            ModuleOptionSpec("max_nodes", .integer(1...10_000), default: .integer(100), doc: "Nodes per account."),
            ModuleOptionSpec("max_items", .integer(1...10_000), default: .integer(256),
                             doc: "Items a node keeps at most (what pubsub#max_items 'max' means)."),
            ModuleOptionSpec("max_item_size", .integer(256...16_777_216), default: .integer(262_144), doc: "Largest item payload in bytes."),
            ModuleOptionSpec("cached_accounts", .integer(100...10_000_000), default: .integer(10_000),
                             doc: "Accounts whose nodes are kept in memory (for last items sent at presence)."),
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
    private let store: any PubSubStore
    private let rosters: any RosterStore
    private let maxNodes: Int
    private let maxItems: Int
    private let maxItemSize: Int
    private let caps = EntityCaps()
    private let cache: NodeCache
    private let serial = KeyedSerialQueue()
    /// Per local resource, the capabilities it was last sent items for (so a status change sends nothing).
    private let served = Mutex<[JID: String]>([:])

    public init(host: any ModuleHost) throws {
        self.host = host
        guard let store = host.service((any PubSubStore).self), let rosters = host.service((any RosterStore).self) else {
            throw ModuleStartError("no PubSub or roster storage available")
        }
        self.store = store
        self.rosters = rosters
        maxNodes = host.options.integer("max_nodes")
        maxItems = host.options.integer("max_items")
        maxItemSize = host.options.integer("max_item_size")
        cache = NodeCache(limit: host.options.integer("cached_accounts"))
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.identity(category: "pubsub", type: "pep", for: .account)
        for feature in Self.features { registrar.feature(feature, for: .account) }
        registrar.iq(.set, "pubsub", PubSubNamespace.pubsub, target: .account) { [self] request in try await set(request) }
        registrar.iq(.get, "pubsub", PubSubNamespace.pubsub, target: .account) { [self] request in try await get(request) }
        registrar.iq(.set, "pubsub", PubSubNamespace.owner, target: .account) { [self] request in try await ownerSet(request) }
        registrar.iq(.get, "pubsub", PubSubNamespace.owner, target: .account) { [self] request in try await ownerGet(request) }
        registrar.discoItems(for: .account) { [self] request in try await discoItems(request) }
        // Our disco#info queries' answers, before anything else routes them.
        registrar.hook(.stanzaFromClient, priority: 1100) { [self] event in
            let stanza = event.stanza
            guard stanza.name == "iq", let origin = event.origin, stanza[attribute: "to"] == host.domain,
                  stanza[attribute: "type"] == "result" || stanza[attribute: "type"] == "error", caps.answer(stanza, from: origin) else { return .pass }
            return .handled
        }
        // Available presence with capabilities: learn them, then send the newest items it wants.
        registrar.hook(.stanzaFromClient, priority: 150) { [self] event in
            let stanza = event.stanza
            guard stanza.name == "presence", stanza[attribute: "type"] == nil, stanza[attribute: "to"] == nil, let origin = event.origin,
                  let advertised = EntityCaps.Advertised(stanza) else { return .pass }
            Task { await presenceArrived(origin, advertised) }
            return .pass
        }
        registrar.hook(.sessionClosed) { [self] event in
            served.withLock { _ = $0.removeValue(forKey: event.jid) }
            caps.forget(event.jid)
            return .pass
        }
        // A new account under a deleted one's name starts without its nodes.
        registrar.hook(.userRegistered) { [self] event in
            cache.drop(event.jid.bare)
            return .pass
        }
        registrar.hook(.clusterMessage) { [self] event in
            let message = event.message
            guard message.namespace == Self.clusterNamespace else { return .pass }
            switch message.name {
            case "changed":
                if let owner = message[attribute: "owner"].flatMap({ JID($0) }) { cache.drop(owner) }
            case "caps":
                if let key = message[attribute: "key"] {
                    caps.learn(key: key, features: Set(message.elements.compactMap { $0[attribute: "var"] }))
                }
            default:
                break
            }
            return .handled
        }
    }

    // MARK: Requests

    private func set(_ request: IQRequest) async throws -> IQResponse {
        let pubsub = request.payload
        if pubsub.child("subscribe", namespace: PubSubNamespace.pubsub) != nil || pubsub.child("unsubscribe", namespace: PubSubNamespace.pubsub) != nil {
            // Contacts follow a PEP node through presence and +notify, not explicit subscriptions.
            return PubSubNamespace.unsupported("subscribe")
        }
        guard request.from.bare == request.to.bare else { return .error(.forbidden, text: "only the account itself publishes here") }
        if let publish = pubsub.child("publish", namespace: PubSubNamespace.pubsub) {
            return try await self.publish(publish, options: pubsub.child("publish-options", namespace: PubSubNamespace.pubsub), owner: request.to.bare)
        }
        if let retract = pubsub.child("retract", namespace: PubSubNamespace.pubsub) { return try await self.retract(retract, owner: request.to.bare) }
        if let create = pubsub.child("create", namespace: PubSubNamespace.pubsub) {
            return try await self.create(create, configure: pubsub.child("configure", namespace: PubSubNamespace.pubsub), owner: request.to.bare)
        }
        return .error(.featureNotImplemented)
    }

    private func get(_ request: IQRequest) async throws -> IQResponse {
        let pubsub = request.payload
        let owner = request.to.bare
        if let items = pubsub.child("items", namespace: PubSubNamespace.pubsub) { return try await self.items(items, owner: owner, requester: request.from.bare) }
        if pubsub.child("subscriptions", namespace: PubSubNamespace.pubsub) != nil {
            return .result(Self.pubsub(XMLElement(name: "subscriptions", namespace: PubSubNamespace.pubsub)))
        }
        if pubsub.child("affiliations", namespace: PubSubNamespace.pubsub) != nil {
            var affiliations = XMLElement(name: "affiliations", namespace: PubSubNamespace.pubsub)
            if request.from.bare == owner {
                for name in try await nodes(of: owner).keys.sorted() {
                    affiliations.append(XMLElement(name: "affiliation", namespace: PubSubNamespace.pubsub, attributes: ["node": name, "affiliation": "owner"]))
                }
            }
            return .result(Self.pubsub(affiliations))
        }
        return .error(.featureNotImplemented)
    }

    private func ownerGet(_ request: IQRequest) async throws -> IQResponse {
        guard request.from.bare == request.to.bare else { return .error(.forbidden) }
        let pubsub = request.payload
        if pubsub.child("default", namespace: PubSubNamespace.owner) != nil {
            let form = NodeConfigForm.form(Self.defaultConfig, maxItemsCap: maxItems)
            return .result(Self.owner(XMLElement(name: "default", namespace: PubSubNamespace.owner).appending(form.element)))
        }
        if let configure = pubsub.child("configure", namespace: PubSubNamespace.owner) {
            guard let name = configure[attribute: "node"], let node = try await nodes(of: request.to.bare)[name] else { return .error(.itemNotFound) }
            var answer = XMLElement(name: "configure", namespace: PubSubNamespace.owner, attributes: ["node": name])
            answer.append(NodeConfigForm.form(node.config, maxItemsCap: maxItems).element)
            return .result(Self.owner(answer))
        }
        if let affiliations = pubsub.child("affiliations", namespace: PubSubNamespace.owner) {
            guard let name = affiliations[attribute: "node"], let node = try await nodes(of: request.to.bare)[name] else { return .error(.itemNotFound) }
            var answer = XMLElement(name: "affiliations", namespace: PubSubNamespace.owner, attributes: ["node": name])
            answer.append(XMLElement(name: "affiliation", namespace: PubSubNamespace.owner, attributes: ["jid": request.to.bare.description, "affiliation": "owner"]))
            for (jid, affiliation) in node.config.affiliations.sorted(by: { $0.key < $1.key }) {
                answer.append(XMLElement(name: "affiliation", namespace: PubSubNamespace.owner, attributes: ["jid": jid, "affiliation": affiliation]))
            }
            return .result(Self.owner(answer))
        }
        return .error(.featureNotImplemented)
    }

    private func ownerSet(_ request: IQRequest) async throws -> IQResponse {
        guard request.from.bare == request.to.bare else { return .error(.forbidden) }
        let owner = request.to.bare
        let pubsub = request.payload
        if let configure = pubsub.child("configure", namespace: PubSubNamespace.owner) {
            return try await self.configure(configure, owner: owner)
        }
        if let delete = pubsub.child("delete", namespace: PubSubNamespace.owner), let name = delete[attribute: "node"] {
            return try await exclusive(owner) { [self] in
                guard let node = try await nodes(of: owner)[name] else { return .error(.itemNotFound) }
                try await store.deletePubSubNode(name, of: owner)
                changed(owner) { $0[name] = nil }
                if node.config.notifyDelete {
                    await notify(owner: owner, node: name, config: node.config,
                                 XMLElement(name: "delete", namespace: PubSubNamespace.event, attributes: ["node": name]))
                }
                return .result(nil)
            }
        }
        if let purge = pubsub.child("purge", namespace: PubSubNamespace.owner), let name = purge[attribute: "node"] {
            return try await exclusive(owner) { [self] in
                guard let node = try await nodes(of: owner)[name] else { return .error(.itemNotFound) }
                try await store.purgePubSubNode(name, of: owner)
                changed(owner) { $0[name]?.last = nil }
                await notify(owner: owner, node: name, config: node.config, XMLElement(name: "purge", namespace: PubSubNamespace.event, attributes: ["node": name]))
                return .result(nil)
            }
        }
        if let affiliations = pubsub.child("affiliations", namespace: PubSubNamespace.owner), let name = affiliations[attribute: "node"] {
            return try await exclusive(owner) { [self] in
                guard var node = try await nodes(of: owner)[name] else { return .error(.itemNotFound) }
                for entry in affiliations.elements where entry.name == "affiliation" {
                    guard let jid = entry[attribute: "jid"].flatMap({ JID($0) })?.bare, jid != owner,
                          let affiliation = entry[attribute: "affiliation"], ["member", "publisher", "outcast", "none"].contains(affiliation)
                    else { return .error(.badRequest, text: "each affiliation needs another account's JID and member, publisher, outcast or none") }
                    node.config.affiliations[jid.description] = affiliation == "none" ? nil : affiliation
                }
                try await store.savePubSubNode(StoredPubSubNode(service: owner, name: name, config: node.config))
                let config = node.config
                changed(owner) { $0[name]?.config = config }
                return .result(nil)
            }
        }
        return .error(.featureNotImplemented)
    }

    // MARK: Publishing

    static var defaultConfig: PubSubNodeConfig { PubSubNodeConfig() }

    private func publish(_ publish: XMLElement, options: XMLElement?, owner: JID) async throws -> IQResponse {
        guard let name = publish[attribute: "node"], Self.validName(name) else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        let items = publish.elements.filter { $0.name == "item" }
        guard items.count <= 1 else { return PubSubNamespace.error(.badRequest, "invalid-payload", text: "publish one item at a time") }
        let payloads = items.first?.elements ?? []
        guard payloads.count == 1 else {
            return PubSubNamespace.error(.badRequest, payloads.isEmpty ? "payload-required" : "invalid-payload")
        }
        let payload = payloads[0].serialized()
        guard payload.utf8.count <= maxItemSize else {
            return PubSubNamespace.error(.notAcceptable, "payload-too-big", text: "items here are at most \(maxItemSize) bytes")
        }
        let id = items.first?[attribute: "id"].flatMap { $0.isEmpty ? nil : $0 } ?? UUID().uuidString.lowercased()
        guard Self.validName(id) else { return PubSubNamespace.error(.badRequest, "item-forbidden", text: "item ids are at most 1024 bytes") }
        let publishOptions = options.flatMap(DataForm.first(in:))
        if options != nil, publishOptions?.formType != PubSubNamespace.publishOptions {
            return .error(.badRequest, text: "publish-options needs a form of type \(PubSubNamespace.publishOptions)")
        }
        return try await exclusive(owner) { [self] in
            let nodes = try await nodes(of: owner)
            var config: PubSubNodeConfig
            if let existing = nodes[name] {
                config = existing.config
                if let publishOptions, let field = NodeConfigForm.unmetPrecondition(publishOptions, node: config, maxItemsCap: maxItems) {
                    return PubSubNamespace.error(.conflict, "precondition-not-met", text: "the node's \(field) differs from the publish options")
                }
            } else {
                guard nodes.count < maxNodes else { return PubSubNamespace.error(.notAllowed, "max-nodes-exceeded", text: "at most \(maxNodes) nodes per account") }
                config = Self.defaultConfig
                if let publishOptions {
                    switch NodeConfigForm.apply(publishOptions, to: config, maxItemsCap: maxItems) {
                    case .success(let wanted): config = wanted
                    case .failure(let problem): return PubSubNamespace.error(.conflict, "precondition-not-met", text: problem.text)
                    }
                }
                try await store.savePubSubNode(StoredPubSubNode(service: owner, name: name, config: config))
            }
            let item = StoredPubSubItem(id: id, publisher: owner.description, payload: payload, published: Int(Date().timeIntervalSince1970))
            if config.persistItems { try await store.publishPubSubItem(item, to: name, service: owner, keep: config.maxItems) }
            let newConfig = config
            changed(owner) { $0[name] = CachedNode(config: newConfig, last: item) }
            await notify(owner: owner, node: name, config: config, Self.itemsEvent(node: name, [item], payloads: config.deliverPayloads))
            var answer = XMLElement(name: "publish", namespace: PubSubNamespace.pubsub, attributes: ["node": name])
            answer.append(XMLElement(name: "item", namespace: PubSubNamespace.pubsub, attributes: ["id": id]))
            return .result(Self.pubsub(answer))
        }
    }

    private func create(_ create: XMLElement, configure: XMLElement?, owner: JID) async throws -> IQResponse {
        guard let name = create[attribute: "node"], Self.validName(name) else { return PubSubNamespace.error(.notAcceptable, "nodeid-required") }
        var config = Self.defaultConfig
        if let form = configure.flatMap(DataForm.first(in:)), form.type == .submit {
            switch NodeConfigForm.apply(form, to: config, maxItemsCap: maxItems) {
            case .success(let wanted): config = wanted
            case .failure(let problem): return .error(.notAcceptable, text: problem.text)
            }
        }
        let wanted = config
        return try await exclusive(owner) { [self] in
            let nodes = try await nodes(of: owner)
            guard nodes[name] == nil else { return .error(.conflict, text: "the node exists") }
            guard nodes.count < maxNodes else { return PubSubNamespace.error(.notAllowed, "max-nodes-exceeded", text: "at most \(maxNodes) nodes per account") }
            try await store.savePubSubNode(StoredPubSubNode(service: owner, name: name, config: wanted))
            changed(owner) { $0[name] = CachedNode(config: wanted, last: nil) }
            return .result(nil)
        }
    }

    private func configure(_ configure: XMLElement, owner: JID) async throws -> IQResponse {
        guard let name = configure[attribute: "node"] else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        guard let form = DataForm.first(in: configure) else { return .error(.badRequest, text: "configure needs a data form") }
        return try await exclusive(owner) { [self] in
            guard let node = try await nodes(of: owner)[name] else { return .error(.itemNotFound) }
            if form.type == .cancel { return .result(nil) }
            guard form.type == .submit, form.formType == nil || form.formType == PubSubNamespace.nodeConfig else {
                return .error(.badRequest, text: "submit a \(PubSubNamespace.nodeConfig) form")
            }
            let config: PubSubNodeConfig
            switch NodeConfigForm.apply(form, to: node.config, maxItemsCap: maxItems) {
            case .success(let wanted): config = wanted
            case .failure(let problem): return .error(.notAcceptable, text: problem.text)
            }
            try await store.savePubSubNode(StoredPubSubNode(service: owner, name: name, config: config))
            if config.maxItems < node.config.maxItems {
                for extra in try await store.pubsubItems(of: name, service: owner, ids: nil, limit: nil).dropFirst(config.maxItems) {
                    _ = try await store.retractPubSubItem(extra.id, from: name, service: owner)
                }
            }
            changed(owner) { $0[name]?.config = config }
            return .result(nil)
        }
    }

    private func retract(_ retract: XMLElement, owner: JID) async throws -> IQResponse {
        guard let name = retract[attribute: "node"] else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        guard let id = retract.child("item", namespace: PubSubNamespace.pubsub)?[attribute: "id"] else { return PubSubNamespace.error(.badRequest, "item-required") }
        let notifyWanted = retract[attribute: "notify"] == "true" || retract[attribute: "notify"] == "1"
        return try await exclusive(owner) { [self] in
            guard let node = try await nodes(of: owner)[name] else { return .error(.itemNotFound) }
            guard try await store.retractPubSubItem(id, from: name, service: owner) else { return .error(.itemNotFound) }
            let newest = try await store.pubsubItems(of: name, service: owner, ids: nil, limit: 1).first
            changed(owner) { $0[name]?.last = newest }
            if notifyWanted || node.config.notifyRetract {
                var items = XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: ["node": name])
                items.append(XMLElement(name: "retract", namespace: PubSubNamespace.event, attributes: ["id": id]))
                await notify(owner: owner, node: name, config: node.config, items)
            }
            return .result(nil)
        }
    }

    // MARK: Reading

    private func items(_ request: XMLElement, owner: JID, requester: JID) async throws -> IQResponse {
        guard let name = request[attribute: "node"] else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        guard let node = try await nodes(of: owner)[name] else { return .error(.itemNotFound) }
        if let refusal = try await refusal(of: requester, owner: owner, config: node.config) { return refusal }
        let ids = request.elements.filter { $0.name == "item" }.compactMap { $0[attribute: "id"] }
        let limit = request[attribute: "max_items"].flatMap { Int($0) }.map { max(0, min($0, maxItems)) }
        var stored = try await store.pubsubItems(of: name, service: owner, ids: ids.isEmpty ? nil : ids, limit: ids.isEmpty ? limit : nil)
        if stored.isEmpty, !node.config.persistItems, let last = node.last, ids.isEmpty || ids.contains(last.id) { stored = [last] }
        var answer = XMLElement(name: "items", namespace: PubSubNamespace.pubsub, attributes: ["node": name])
        // Oldest first, as they were published.
        for item in stored.reversed() { answer.append(Self.itemElement(item, namespace: PubSubNamespace.pubsub, payload: true)) }
        return .result(Self.pubsub(answer))
    }

    private func discoItems(_ request: IQRequest) async throws -> [XMLElement]? {
        let owner = request.to.bare
        let requester = request.from.bare
        let nodes = try await nodes(of: owner)
        let rosterItem = requester == owner ? nil : try await rosters.item(of: owner, contact: requester)
        if let name = request.payload[attribute: "node"] {
            guard let node = nodes[name], Self.access(of: requester, owner: owner, config: node.config, rosterItem: rosterItem) == nil else { return nil }
            return try await store.pubsubItems(of: name, service: owner, ids: nil, limit: nil).reversed().map {
                XMLElement(name: "item", namespace: PubSubNamespace.discoItems, attributes: ["jid": owner.description, "name": $0.id])
            }
        }
        return nodes.keys.sorted().filter { Self.access(of: requester, owner: owner, config: nodes[$0]!.config, rosterItem: rosterItem) == nil }.map { name in
            var attributes = ["jid": owner.description, "node": name]
            attributes["name"] = nodes[name]?.config.title
            return XMLElement(name: "item", namespace: PubSubNamespace.discoItems, attributes: attributes)
        }
    }

    /// Why `requester` may not read a node of `owner` (XEP-0060 §6.5.9's conditions), or nil.
    private func refusal(of requester: JID, owner: JID, config: PubSubNodeConfig) async throws -> IQResponse? {
        guard requester != owner else { return nil }
        let rosterItem = config.accessModel == "presence" || config.accessModel == "roster" ? try await rosters.item(of: owner, contact: requester) : nil
        return Self.access(of: requester, owner: owner, config: config, rosterItem: rosterItem)
    }

    static func access(of requester: JID, owner: JID, config: PubSubNodeConfig, rosterItem: RosterItem?) -> IQResponse? {
        if requester == owner { return nil }
        let affiliation = config.affiliations[requester.description]
        if affiliation == "outcast" { return .error(.forbidden) }
        switch config.accessModel {
        case "open":
            return nil
        case "presence":
            return rosterItem?.subscription.contactReceivesPresence == true ? nil : PubSubNamespace.error(.notAuthorized, "presence-subscription-required")
        case "roster":
            guard let groups = rosterItem?.groups, !Set(groups).isDisjoint(with: config.rosterGroupsAllowed) else {
                return PubSubNamespace.error(.notAuthorized, "not-in-roster-group")
            }
            return nil
        default:
            return affiliation == "member" || affiliation == "publisher" ? nil : PubSubNamespace.error(.notAllowed, "closed-node")
        }
    }

    // MARK: Notifications

    /// Sends `event` to every available resource that may read the node and wants it (`+notify`): the
    /// owner's own, and those of contacts who see the owner's presence.
    private func notify(owner: JID, node: String, config: PubSubNodeConfig, _ event: XMLElement) async {
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
            where item.subscription.contactReceivesPresence && item.jid.localpart != nil && host.isLocal(item.jid.domainpart)
                && Self.access(of: item.jid, owner: owner, config: config, rosterItem: item) == nil {
                add(host.resources(of: item.jid))
            }
        } catch {
            host.log(.warning, "PEP notifications for \(owner) went to its own resources only: the roster could not be read: \(error)")
        }
        guard !recipients.isEmpty else { return }
        host.deliver(Self.notification(from: owner, event), to: recipients)
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
        let interests = Set(features.filter { $0.hasSuffix("+notify") }.map { String($0.dropLast("+notify".count)) })
        guard !interests.isEmpty else { return }
        do {
            try await sendLastItems(of: resource.bare, to: resource, interests: interests)
            for item in try await rosters.roster(of: resource.bare).items
            where item.subscription.userReceivesPresence && item.jid.localpart != nil && host.isLocal(item.jid.domainpart) {
                try await sendLastItems(of: item.jid, to: resource, interests: interests)
            }
        } catch {
            host.log(.warning, "PEP: could not send the newest items to \(resource): \(error)")
        }
    }

    private func sendLastItems(of owner: JID, to resource: JID, interests: Set<String>) async throws {
        let relevant = try await nodes(of: owner).filter {
            interests.contains($0.key) && $0.value.last != nil && $0.value.config.sendLastPublishedItem == "on_sub_and_presence"
        }
        guard !relevant.isEmpty else { return }
        let rosterItem = owner == resource.bare ? nil : try await rosters.item(of: owner, contact: resource.bare)
        for (name, node) in relevant.sorted(by: { $0.key < $1.key })
        where Self.access(of: resource.bare, owner: owner, config: node.config, rosterItem: rosterItem) == nil {
            var message = Self.notification(from: owner, Self.itemsEvent(node: name, [node.last!], payloads: node.config.deliverPayloads))
            message[attribute: "to"] = resource.description
            host.route(message)
        }
    }

    // MARK: Helpers

    /// Runs one change to an owner's nodes at a time, in arrival order.
    private func exclusive(_ owner: JID, _ work: @escaping @Sendable () async throws -> IQResponse) async throws -> IQResponse {
        let result: Result<IQResponse, any Error> = await withCheckedContinuation { continuation in
            serial.enqueue(owner) {
                do { continuation.resume(returning: .success(try await work())) } catch { continuation.resume(returning: .failure(error)) }
            }
        }
        return try result.get()
    }

    private func nodes(of owner: JID) async throws -> [String: CachedNode] {
        try await cache.nodes(of: owner) { [store] in
            var nodes: [String: CachedNode] = [:]
            for node in try await store.pubsubNodes(of: owner) {
                nodes[node.name] = CachedNode(config: node.config, last: try await store.pubsubItems(of: node.name, service: owner, ids: nil, limit: 1).first)
            }
            return nodes
        }
    }

    /// Records a change here and tells the other nodes of a cluster to read the owner's nodes again.
    private func changed(_ owner: JID, _ change: (inout [String: CachedNode]) -> Void) {
        cache.update(owner, change)
        host.broadcastToCluster(XMLElement(name: "changed", namespace: Self.clusterNamespace, attributes: ["owner": owner.description]))
    }

    static func validName(_ name: String) -> Bool { !name.isEmpty && name.utf8.count <= 1024 }

    static func pubsub(_ child: XMLElement) -> XMLElement {
        XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub).appending(child)
    }

    static func owner(_ child: XMLElement) -> XMLElement {
        XMLElement(name: "pubsub", namespace: PubSubNamespace.owner).appending(child)
    }

    static func itemElement(_ item: StoredPubSubItem, namespace: String, payload: Bool) -> XMLElement {
        var element = XMLElement(name: "item", namespace: namespace, attributes: ["id": item.id])
        if payload, !item.payload.isEmpty, let parsed = XMLFragmentParser.parse(item.payload, defaultNamespace: "") { element.append(parsed) }
        return element
    }

    static func itemsEvent(node: String, _ items: [StoredPubSubItem], payloads: Bool) -> XMLElement {
        var event = XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: ["node": node])
        for item in items { event.append(itemElement(item, namespace: PubSubNamespace.event, payload: payloads)) }
        return event
    }

    static func notification(from owner: JID, _ content: XMLElement) -> XMLElement {
        var message = XMLElement(name: "message", namespace: Namespace.client,
                                 attributes: ["from": owner.description, "type": "headline", "id": UUID().uuidString.lowercased()])
        message.append(XMLElement(name: "event", namespace: PubSubNamespace.event).appending(content))
        return message
    }
}

extension XMLElement {
    fileprivate func appending(_ child: XMLElement) -> XMLElement {
        var copy = self
        copy.append(child)
        return copy
    }
}
