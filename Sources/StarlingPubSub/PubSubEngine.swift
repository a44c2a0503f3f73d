import Foundation
import StarlingAPI
import StarlingStorage
import StarlingXML

/// What an account's PEP service and a PubSub service at its own domain do differently.
struct PubSubRules: Sendable {
    /// Whether entities subscribe explicitly (a service); PEP contacts follow through presence instead.
    let subscriptions: Bool
    /// Nodes one service holds at most.
    let maxNodes: Int
    /// Items a node keeps at most (what `max` means).
    let maxItems: Int
    /// Largest payload, in bytes.
    let maxItemSize: Int
    /// Whether `requester` (bare) may create nodes at `service`.
    let mayCreate: @Sendable (_ requester: JID, _ service: JID) -> Bool
    /// Bare JIDs that own every node (a service's admins).
    let admins: Set<JID>
}

/// XEP-0060 node handling shared by PEP and the PubSub service: requests in both namespaces, the
/// access models, publish-options, quotas, the per-service cache and notifications. Who gets a
/// notification is the caller's to say (`recipients`).
final class PubSubEngine: Sendable {
    typealias Recipients = @Sendable (_ service: JID, _ node: String, _ cached: CachedNode) async -> [JID]
    /// Runs after an item is stored and notified (PEP's avatar-to-vCard conversion), one service at a time.
    typealias Published = @Sendable (_ engine: PubSubEngine, _ service: JID, _ node: String, _ item: StoredPubSubItem) async -> Void

    let rules: PubSubRules
    private let host: any ModuleHost
    private let store: any PubSubStore
    private let rosters: any RosterStore
    private let cache: NodeCache
    private let serial = KeyedSerialQueue()
    private let clusterNamespace: String
    private let recipients: Recipients
    private let published: Published?

    init(host: any ModuleHost, store: any PubSubStore, rosters: any RosterStore, rules: PubSubRules, cachedServices: Int, clusterNamespace: String,
         published: Published? = nil, recipients: @escaping Recipients) {
        self.host = host
        self.store = store
        self.rosters = rosters
        self.rules = rules
        cache = NodeCache(limit: cachedServices)
        self.clusterNamespace = clusterNamespace
        self.recipients = recipients
        self.published = published
    }

    static var defaultConfig: PubSubNodeConfig { PubSubNodeConfig() }

    // MARK: Requests

    /// Answers one `<pubsub/>` IQ addressed to `service` (an account's bare JID, or a service's domain).
    func handle(_ request: IQRequest, type: IQType, service: JID) async throws -> IQResponse {
        let pubsub = request.payload
        let requester = request.from.bare
        switch (type, pubsub.namespace) {
        case (.set, PubSubNamespace.pubsub):
            if let subscribe = pubsub.child("subscribe", namespace: PubSubNamespace.pubsub) {
                guard rules.subscriptions else { return PubSubNamespace.unsupported("subscribe") }
                return try await self.subscribe(subscribe, from: request.from, service: service)
            }
            if let unsubscribe = pubsub.child("unsubscribe", namespace: PubSubNamespace.pubsub) {
                guard rules.subscriptions else { return PubSubNamespace.unsupported("subscribe") }
                return try await self.unsubscribe(unsubscribe, from: request.from, service: service)
            }
            if let publish = pubsub.child("publish", namespace: PubSubNamespace.pubsub) {
                return try await self.publish(publish, options: pubsub.child("publish-options", namespace: PubSubNamespace.pubsub), by: requester, service: service)
            }
            if let retract = pubsub.child("retract", namespace: PubSubNamespace.pubsub) { return try await self.retract(retract, by: requester, service: service) }
            if let create = pubsub.child("create", namespace: PubSubNamespace.pubsub) {
                return try await self.create(create, configure: pubsub.child("configure", namespace: PubSubNamespace.pubsub), by: requester, service: service)
            }
        case (.get, PubSubNamespace.pubsub):
            if let items = pubsub.child("items", namespace: PubSubNamespace.pubsub) { return try await self.items(items, for: requester, service: service) }
            if let subscriptions = pubsub.child("subscriptions", namespace: PubSubNamespace.pubsub) {
                return try await self.ownSubscriptions(of: request.from, node: subscriptions[attribute: "node"], service: service)
            }
            if pubsub.child("affiliations", namespace: PubSubNamespace.pubsub) != nil { return try await ownAffiliations(of: requester, service: service) }
        case (.get, PubSubNamespace.owner):
            if pubsub.child("default", namespace: PubSubNamespace.owner) != nil {
                let form = NodeConfigForm.form(Self.defaultConfig, maxItemsCap: rules.maxItems)
                return .result(Self.owner(XMLElement(name: "default", namespace: PubSubNamespace.owner).appending(form.element)))
            }
            if let configure = pubsub.child("configure", namespace: PubSubNamespace.owner) {
                return try await owned(configure, by: requester, service: service) { name, node in
                    .result(Self.owner(XMLElement(name: "configure", namespace: PubSubNamespace.owner, attributes: ["node": name])
                        .appending(NodeConfigForm.form(node.config, maxItemsCap: self.rules.maxItems).element)))
                }
            }
            if let affiliations = pubsub.child("affiliations", namespace: PubSubNamespace.owner) {
                return try await owned(affiliations, by: requester, service: service) { name, node in
                    var answer = XMLElement(name: "affiliations", namespace: PubSubNamespace.owner, attributes: ["node": name])
                    if service.localpart != nil {
                        answer.append(XMLElement(name: "affiliation", namespace: PubSubNamespace.owner, attributes: ["jid": service.description, "affiliation": "owner"]))
                    }
                    for (jid, affiliation) in node.config.affiliations.sorted(by: { $0.key < $1.key }) {
                        answer.append(XMLElement(name: "affiliation", namespace: PubSubNamespace.owner, attributes: ["jid": jid, "affiliation": affiliation]))
                    }
                    return .result(Self.owner(answer))
                }
            }
            if let subscriptions = pubsub.child("subscriptions", namespace: PubSubNamespace.owner), rules.subscriptions {
                return try await owned(subscriptions, by: requester, service: service) { name, node in
                    var answer = XMLElement(name: "subscriptions", namespace: PubSubNamespace.owner, attributes: ["node": name])
                    for (jid, state) in node.subscriptions.sorted(by: { $0.key < $1.key }) {
                        answer.append(XMLElement(name: "subscription", namespace: PubSubNamespace.owner, attributes: ["jid": jid, "subscription": state]))
                    }
                    return .result(Self.owner(answer))
                }
            }
        case (.set, PubSubNamespace.owner):
            if let configure = pubsub.child("configure", namespace: PubSubNamespace.owner) { return try await self.configure(configure, by: requester, service: service) }
            if let delete = pubsub.child("delete", namespace: PubSubNamespace.owner) { return try await self.delete(delete, by: requester, service: service) }
            if let purge = pubsub.child("purge", namespace: PubSubNamespace.owner) { return try await self.purge(purge, by: requester, service: service) }
            if let affiliations = pubsub.child("affiliations", namespace: PubSubNamespace.owner) {
                return try await setAffiliations(affiliations, by: requester, service: service)
            }
            if let subscriptions = pubsub.child("subscriptions", namespace: PubSubNamespace.owner), rules.subscriptions {
                return try await setSubscriptions(subscriptions, by: requester, service: service)
            }
        default:
            break
        }
        return .error(.featureNotImplemented)
    }

    // MARK: Affiliations and access

    /// `owner`, `publisher`, `member`, `outcast` or `none`.
    func affiliation(of requester: JID, service: JID, config: PubSubNodeConfig) -> String {
        if service.localpart != nil, requester == service { return "owner" }
        if rules.admins.contains(requester) { return "owner" }
        return config.affiliations[requester.description] ?? "none"
    }

    /// Why `requester` (bare) may not read the node (XEP-0060 §6.5.9's conditions), or nil.
    func refusal(of requester: JID, service: JID, node: CachedNode) async throws -> IQResponse? {
        let affiliation = affiliation(of: requester, service: service, config: node.config)
        if affiliation == "outcast" { return .error(.forbidden) }
        if affiliation != "none" { return nil }
        switch node.config.accessModel {
        case "open":
            return nil
        case "presence":
            let items = try await rosterItems(of: requester, owners: owners(of: node.config, service: service))
            return items.contains { $0.subscription.contactReceivesPresence } ? nil : PubSubNamespace.error(.notAuthorized, "presence-subscription-required")
        case "roster":
            let items = try await rosterItems(of: requester, owners: owners(of: node.config, service: service))
            let allowed = Set(node.config.rosterGroupsAllowed)
            return items.contains { !allowed.isDisjoint(with: $0.groups) } ? nil : PubSubNamespace.error(.notAuthorized, "not-in-roster-group")
        case "authorize":
            return node.subscriptions.contains { JID($0.key)?.bare == requester && $0.value == "subscribed" } ? nil
                : PubSubNamespace.error(.notAuthorized, "not-subscribed")
        default:
            return PubSubNamespace.error(.notAllowed, "closed-node")
        }
    }

    /// The local accounts that own a node: the PEP service's account, or those with the owner affiliation.
    func owners(of config: PubSubNodeConfig, service: JID) -> [JID] {
        if service.localpart != nil { return [service] }
        return config.affiliations.filter { $0.value == "owner" }.compactMap { JID($0.key) }.filter { host.isLocal($0.domainpart) && $0.localpart != nil }
    }

    private func rosterItems(of requester: JID, owners: [JID]) async throws -> [RosterItem] {
        var items: [RosterItem] = []
        for owner in owners {
            if let item = try await rosters.item(of: owner, contact: requester) { items.append(item) }
        }
        return items
    }

    // MARK: Publishing

    private func publish(_ publish: XMLElement, options: XMLElement?, by requester: JID, service: JID) async throws -> IQResponse {
        guard let name = publish[attribute: "node"], Self.validName(name) else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        let items = publish.elements.filter { $0.name == "item" }
        guard items.count <= 1 else { return PubSubNamespace.error(.badRequest, "invalid-payload", text: "publish one item at a time") }
        let payloads = items.first?.elements ?? []
        guard payloads.count == 1 else {
            return PubSubNamespace.error(.badRequest, payloads.isEmpty ? "payload-required" : "invalid-payload")
        }
        let payload = payloads[0].serialized()
        guard payload.utf8.count <= rules.maxItemSize else {
            return PubSubNamespace.error(.notAcceptable, "payload-too-big", text: "items here are at most \(rules.maxItemSize) bytes")
        }
        let id = items.first?[attribute: "id"].flatMap { $0.isEmpty ? nil : $0 } ?? UUID().uuidString.lowercased()
        guard Self.validName(id) else { return PubSubNamespace.error(.badRequest, "item-forbidden", text: "item ids are at most 1024 bytes") }
        let publishOptions = options.flatMap(DataForm.first(in:))
        if options != nil, publishOptions?.formType != PubSubNamespace.publishOptions {
            return .error(.badRequest, text: "publish-options needs a form of type \(PubSubNamespace.publishOptions)")
        }
        return try await exclusive(service) { [self] in
            let nodes = try await nodes(of: service)
            var node: CachedNode
            if let existing = nodes[name] {
                node = existing
                if let refusal = try await publishRefusal(of: requester, service: service, node: node) { return refusal }
                if let publishOptions, let field = NodeConfigForm.unmetPrecondition(publishOptions, node: node.config, maxItemsCap: rules.maxItems) {
                    return PubSubNamespace.error(.conflict, "precondition-not-met", text: "the node's \(field) differs from the publish options")
                }
            } else {
                // Another account's PEP service is closed to us whatever its nodes; a service's missing node is just missing.
                guard rules.mayCreate(requester, service) else { return .error(service.localpart == nil ? .itemNotFound : .forbidden) }
                guard nodes.count < rules.maxNodes else { return PubSubNamespace.error(.notAllowed, "max-nodes-exceeded", text: "at most \(rules.maxNodes) nodes here") }
                var config = newConfig(createdBy: requester, service: service)
                if let publishOptions {
                    switch NodeConfigForm.apply(publishOptions, to: config, maxItemsCap: rules.maxItems) {
                    case .success(let wanted): config = wanted
                    case .failure(let problem): return PubSubNamespace.error(.conflict, "precondition-not-met", text: problem.text)
                    }
                }
                try await store.savePubSubNode(StoredPubSubNode(service: service, name: name, config: config))
                node = CachedNode(config: config)
            }
            let item = StoredPubSubItem(id: id, publisher: requester.description, payload: payload, published: Int(Date().timeIntervalSince1970))
            if node.config.persistItems { try await store.publishPubSubItem(item, to: name, service: service, keep: node.config.maxItems) }
            node.setLast(item)
            let updated = node
            changed(service) { $0[name] = updated }
            await notify(service: service, node: name, updated, Self.itemsEvent(node: name, [item], payloads: updated.config.deliverPayloads))
            await published?(self, service, name, item)
            var answer = XMLElement(name: "publish", namespace: PubSubNamespace.pubsub, attributes: ["node": name])
            answer.append(XMLElement(name: "item", namespace: PubSubNamespace.pubsub, attributes: ["id": id]))
            return .result(Self.pubsub(answer))
        }
    }

    private func publishRefusal(of requester: JID, service: JID, node: CachedNode) async throws -> IQResponse? {
        let affiliation = affiliation(of: requester, service: service, config: node.config)
        if affiliation == "owner" || affiliation == "publisher" { return nil }
        if affiliation != "outcast", node.config.publishModel == "open", try await refusal(of: requester, service: service, node: node) == nil { return nil }
        return .error(.forbidden, text: "only the node's owners and publishers publish here")
    }

    /// A new node's configuration: the defaults, with its creator as owner (a PEP node's owner is the account).
    private func newConfig(createdBy creator: JID, service: JID) -> PubSubNodeConfig {
        var config = Self.defaultConfig
        if service.localpart == nil {
            config.affiliations[creator.description] = "owner"
            // A service's nodes are open unless configured otherwise; PEP's follow presence.
            config.accessModel = "open"
        }
        return config
    }

    private func create(_ create: XMLElement, configure: XMLElement?, by requester: JID, service: JID) async throws -> IQResponse {
        guard rules.mayCreate(requester, service) else { return .error(.forbidden, text: "you may not create nodes here") }
        let named = create[attribute: "node"]
        // XEP-0060 §8.1.2: an instant node gets a name from the service.
        let name = named ?? UUID().uuidString.lowercased()
        guard Self.validName(name) else { return PubSubNamespace.error(.notAcceptable, "nodeid-required") }
        var config = newConfig(createdBy: requester, service: service)
        if let form = configure.flatMap(DataForm.first(in:)), form.type == .submit {
            switch NodeConfigForm.apply(form, to: config, maxItemsCap: rules.maxItems) {
            case .success(let wanted): config = wanted
            case .failure(let problem): return .error(.notAcceptable, text: problem.text)
            }
        }
        let wanted = config
        return try await exclusive(service) { [self] in
            let nodes = try await nodes(of: service)
            guard nodes[name] == nil else { return .error(.conflict, text: "the node exists") }
            guard nodes.count < rules.maxNodes else { return PubSubNamespace.error(.notAllowed, "max-nodes-exceeded", text: "at most \(rules.maxNodes) nodes here") }
            try await store.savePubSubNode(StoredPubSubNode(service: service, name: name, config: wanted))
            changed(service) { $0[name] = CachedNode(config: wanted) }
            guard named == nil else { return .result(nil) }
            return .result(Self.pubsub(XMLElement(name: "create", namespace: PubSubNamespace.pubsub, attributes: ["node": name])))
        }
    }

    private func configure(_ configure: XMLElement, by requester: JID, service: JID) async throws -> IQResponse {
        guard let form = DataForm.first(in: configure) else { return .error(.badRequest, text: "configure needs a data form") }
        return try await ownedChange(configure, by: requester, service: service) { [self] name, node in
            if form.type == .cancel { return .result(nil) }
            guard form.type == .submit, form.formType == nil || form.formType == PubSubNamespace.nodeConfig else {
                return .error(.badRequest, text: "submit a \(PubSubNamespace.nodeConfig) form")
            }
            let config: PubSubNodeConfig
            switch NodeConfigForm.apply(form, to: node.config, maxItemsCap: rules.maxItems) {
            case .success(let wanted): config = wanted
            case .failure(let problem): return .error(.notAcceptable, text: problem.text)
            }
            try await store.savePubSubNode(StoredPubSubNode(service: service, name: name, config: config))
            if config.maxItems < node.config.maxItems {
                for extra in try await store.pubsubItems(of: name, service: service, ids: nil, limit: nil).dropFirst(config.maxItems) {
                    _ = try await store.retractPubSubItem(extra.id, from: name, service: service)
                }
            }
            changed(service) { $0[name]?.config = config }
            return .result(nil)
        }
    }

    private func delete(_ delete: XMLElement, by requester: JID, service: JID) async throws -> IQResponse {
        try await ownedChange(delete, by: requester, service: service) { [self] name, node in
            try await store.deletePubSubNode(name, of: service)
            changed(service) { $0[name] = nil }
            if node.config.notifyDelete {
                await notify(service: service, node: name, node, XMLElement(name: "delete", namespace: PubSubNamespace.event, attributes: ["node": name]))
            }
            return .result(nil)
        }
    }

    private func purge(_ purge: XMLElement, by requester: JID, service: JID) async throws -> IQResponse {
        try await ownedChange(purge, by: requester, service: service) { [self] name, node in
            try await store.purgePubSubNode(name, of: service)
            changed(service) { $0[name]?.setLast(nil) }
            await notify(service: service, node: name, node, XMLElement(name: "purge", namespace: PubSubNamespace.event, attributes: ["node": name]))
            return .result(nil)
        }
    }

    private func setAffiliations(_ affiliations: XMLElement, by requester: JID, service: JID) async throws -> IQResponse {
        try await ownedChange(affiliations, by: requester, service: service) { [self] name, node in
            var config = node.config
            for entry in affiliations.elements where entry.name == "affiliation" {
                guard let jid = entry[attribute: "jid"].flatMap({ JID($0) })?.bare, jid != service,
                      let affiliation = entry[attribute: "affiliation"], ["owner", "member", "publisher", "outcast", "none"].contains(affiliation)
                else { return .error(.badRequest, text: "each affiliation needs a JID and owner, member, publisher, outcast or none") }
                if affiliation == "owner", service.localpart != nil { return .error(.notAcceptable, text: "a PEP node has one owner: the account") }
                config.affiliations[jid.description] = affiliation == "none" ? nil : affiliation
            }
            if service.localpart == nil, !config.affiliations.values.contains("owner") {
                return .error(.notAcceptable, text: "a node keeps at least one owner")
            }
            try await store.savePubSubNode(StoredPubSubNode(service: service, name: name, config: config))
            let updated = config
            changed(service) { $0[name]?.config = updated }
            return .result(nil)
        }
    }

    // MARK: Subscriptions (a service's)

    private func subscribe(_ subscribe: XMLElement, from requester: JID, service: JID) async throws -> IQResponse {
        guard let name = subscribe[attribute: "node"] else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        guard let jid = subscribe[attribute: "jid"].flatMap({ JID($0) }), jid.bare == requester.bare else {
            return PubSubNamespace.error(.badRequest, "invalid-jid", text: "subscribe your own JID")
        }
        return try await exclusive(service) { [self] in
            guard var node = try await nodes(of: service)[name] else { return .error(.itemNotFound) }
            let affiliation = affiliation(of: requester.bare, service: service, config: node.config)
            let state: String
            if affiliation == "outcast" { return .error(.forbidden) }
            if node.config.accessModel == "authorize", affiliation == "none" {
                state = node.subscriptions[jid.description] == "subscribed" ? "subscribed" : "pending"
            } else {
                if let refusal = try await refusal(of: requester.bare, service: service, node: node) { return refusal }
                state = "subscribed"
            }
            try await store.setPubSubSubscription(jid.description, state: state, node: name, service: service)
            node.subscriptions[jid.description] = state
            let updated = node
            changed(service) { $0[name]?.subscriptions = updated.subscriptions }
            if state == "pending" { askOwners(to: name, service: service, config: node.config, subscriber: jid) }
            if state == "subscribed", node.config.sendLastPublishedItem != "never", let last = try await newest(of: node, name: name, service: service) {
                sendItems(node: name, [last], payloads: node.config.deliverPayloads, from: service, to: jid)
            }
            return .result(Self.pubsub(XMLElement(name: "subscription", namespace: PubSubNamespace.pubsub,
                                                  attributes: ["node": name, "jid": jid.description, "subscription": state])))
        }
    }

    private func unsubscribe(_ unsubscribe: XMLElement, from requester: JID, service: JID) async throws -> IQResponse {
        guard let name = unsubscribe[attribute: "node"] else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        guard let jid = unsubscribe[attribute: "jid"].flatMap({ JID($0) }), jid.bare == requester.bare else {
            return PubSubNamespace.error(.badRequest, "invalid-jid", text: "unsubscribe your own JID")
        }
        return try await exclusive(service) { [self] in
            guard let node = try await nodes(of: service)[name] else { return .error(.itemNotFound) }
            guard node.subscriptions[jid.description] != nil else { return PubSubNamespace.error(.unexpectedRequest, "not-subscribed") }
            try await store.setPubSubSubscription(jid.description, state: nil, node: name, service: service)
            changed(service) { $0[name]?.subscriptions[jid.description] = nil }
            return .result(nil)
        }
    }

    private func setSubscriptions(_ subscriptions: XMLElement, by requester: JID, service: JID) async throws -> IQResponse {
        try await ownedChange(subscriptions, by: requester, service: service) { [self] name, node in
            for entry in subscriptions.elements where entry.name == "subscription" {
                guard let jid = entry[attribute: "jid"].flatMap({ JID($0) }), let state = entry[attribute: "subscription"],
                      ["subscribed", "none"].contains(state) else { return .error(.badRequest, text: "each subscription needs a JID and subscribed or none") }
                try await decide(jid, subscribed: state == "subscribed", node: name, cached: node, service: service)
            }
            return .result(nil)
        }
    }

    /// An owner's answer to a pending subscription (through the subscriptions list or the approval form).
    private func decide(_ jid: JID, subscribed: Bool, node name: String, cached node: CachedNode, service: JID) async throws {
        try await store.setPubSubSubscription(jid.description, state: subscribed ? "subscribed" : nil, node: name, service: service)
        changed(service) { $0[name]?.subscriptions[jid.description] = subscribed ? "subscribed" : nil }
        // XEP-0060 §8.6: the subscriber learns the outcome.
        var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["from": service.description, "to": jid.description])
        message.append(XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub).appending(
            XMLElement(name: "subscription", namespace: PubSubNamespace.pubsub,
                       attributes: ["node": name, "jid": jid.description, "subscription": subscribed ? "subscribed" : "none"])))
        host.route(message)
    }

    /// XEP-0060 §8.6: each owner gets a form to approve or deny the subscription.
    private func askOwners(to name: String, service: JID, config: PubSubNodeConfig, subscriber: JID) {
        let form = DataForm(type: .form, formType: "http://jabber.org/protocol/pubsub#subscribe_authorization", title: "PubSub subscriber request", fields: [
            DataForm.Field("pubsub#node", type: "text-single", label: "Node ID", values: [name]),
            DataForm.Field("pubsub#subscriber_jid", type: "jid-single", label: "Subscriber Address", values: [subscriber.description]),
            DataForm.Field("pubsub#allow", type: "boolean", label: "Allow this JID to subscribe to this pubsub node?", values: ["false"]),
        ])
        for owner in config.affiliations.filter({ $0.value == "owner" }).keys.sorted() {
            var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["from": service.description, "to": owner])
            message.append(form.element)
            host.route(message)
        }
    }

    /// An owner's submitted approval form (a message to the service); false when it is not one.
    func approval(_ message: XMLElement, from sender: JID, service: JID) async throws -> Bool {
        guard let form = DataForm.first(in: message), form.formType == "http://jabber.org/protocol/pubsub#subscribe_authorization",
              form.type == .submit, let name = form["pubsub#node"]?.value,
              let subscriber = form["pubsub#subscriber_jid"]?.value.flatMap({ JID($0) }) else { return false }
        let allow = form.boolean("pubsub#allow") ?? false
        _ = try await ownedChange(XMLElement(name: "node", attributes: ["node": name]), by: sender.bare, service: service) { [self] name, node in
            guard node.subscriptions[subscriber.description] == "pending" else { return .result(nil) }
            try await decide(subscriber, subscribed: allow, node: name, cached: node, service: service)
            return .result(nil)
        }
        return true
    }

    private func ownSubscriptions(of requester: JID, node only: String?, service: JID) async throws -> IQResponse {
        var answer = XMLElement(name: "subscriptions", namespace: PubSubNamespace.pubsub)
        answer[attribute: "node"] = only
        for (name, node) in try await nodes(of: service).sorted(by: { $0.key < $1.key }) where only == nil || only == name {
            for (jid, state) in node.subscriptions.sorted(by: { $0.key < $1.key }) where JID(jid)?.bare == requester.bare {
                answer.append(XMLElement(name: "subscription", namespace: PubSubNamespace.pubsub, attributes: ["node": name, "jid": jid, "subscription": state]))
            }
        }
        return .result(Self.pubsub(answer))
    }

    private func ownAffiliations(of requester: JID, service: JID) async throws -> IQResponse {
        var answer = XMLElement(name: "affiliations", namespace: PubSubNamespace.pubsub)
        for (name, node) in try await nodes(of: service).sorted(by: { $0.key < $1.key }) {
            let affiliation = affiliation(of: requester, service: service, config: node.config)
            guard affiliation != "none" else { continue }
            answer.append(XMLElement(name: "affiliation", namespace: PubSubNamespace.pubsub, attributes: ["node": name, "affiliation": affiliation]))
        }
        return .result(Self.pubsub(answer))
    }

    // MARK: Reading

    private func retract(_ retract: XMLElement, by requester: JID, service: JID) async throws -> IQResponse {
        guard let name = retract[attribute: "node"] else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        guard let id = retract.child("item", namespace: PubSubNamespace.pubsub)?[attribute: "id"] else { return PubSubNamespace.error(.badRequest, "item-required") }
        let notifyWanted = retract[attribute: "notify"] == "true" || retract[attribute: "notify"] == "1"
        return try await exclusive(service) { [self] in
            guard let node = try await nodes(of: service)[name] else { return .error(.itemNotFound) }
            let affiliation = affiliation(of: requester, service: service, config: node.config)
            guard affiliation == "owner" || affiliation == "publisher" else { return .error(.forbidden) }
            guard try await store.retractPubSubItem(id, from: name, service: service) else { return .error(.itemNotFound) }
            let newest = try await store.pubsubItems(of: name, service: service, ids: nil, limit: 1).first
            changed(service) { $0[name]?.setLast(newest) }
            if notifyWanted || node.config.notifyRetract {
                var items = XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: ["node": name])
                items.append(XMLElement(name: "retract", namespace: PubSubNamespace.event, attributes: ["id": id]))
                await notify(service: service, node: name, node, items)
            }
            return .result(nil)
        }
    }

    private func items(_ request: XMLElement, for requester: JID, service: JID) async throws -> IQResponse {
        guard let name = request[attribute: "node"] else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        guard let node = try await nodes(of: service)[name] else { return .error(.itemNotFound) }
        if let refusal = try await refusal(of: requester, service: service, node: node) { return refusal }
        let ids = request.elements.filter { $0.name == "item" }.compactMap { $0[attribute: "id"] }
        let limit = request[attribute: "max_items"].flatMap { Int($0) }.map { max(0, min($0, rules.maxItems)) }
        var stored = try await store.pubsubItems(of: name, service: service, ids: ids.isEmpty ? nil : ids, limit: ids.isEmpty ? limit : nil)
        if stored.isEmpty, !node.config.persistItems, let last = node.last, ids.isEmpty || ids.contains(last.id) { stored = [last] }
        var answer = XMLElement(name: "items", namespace: PubSubNamespace.pubsub, attributes: ["node": name])
        // Oldest first, as they were published.
        for item in stored.reversed() { answer.append(Self.itemElement(item, namespace: PubSubNamespace.pubsub, payload: true)) }
        return .result(Self.pubsub(answer))
    }

    /// disco#items on the service: the nodes `requester` may read; with `node`, that node's item ids.
    func discoItems(node only: String?, for requester: JID, service: JID) async throws -> [XMLElement]? {
        let nodes = try await nodes(of: service)
        if let only {
            guard let node = nodes[only], try await refusal(of: requester, service: service, node: node) == nil else { return nil }
            return try await store.pubsubItems(of: only, service: service, ids: nil, limit: nil).reversed().map {
                XMLElement(name: "item", namespace: PubSubNamespace.discoItems, attributes: ["jid": service.description, "name": $0.id])
            }
        }
        var items: [XMLElement] = []
        for name in nodes.keys.sorted() where try await refusal(of: requester, service: service, node: nodes[name]!) == nil {
            var attributes = ["jid": service.description, "node": name]
            attributes["name"] = nodes[name]?.config.title
            items.append(XMLElement(name: "item", namespace: PubSubNamespace.discoItems, attributes: attributes))
        }
        return items
    }

    // MARK: Notifications

    func notify(service: JID, node: String, _ cached: CachedNode, _ event: XMLElement) async {
        let targets = await recipients(service, node, cached)
        guard !targets.isEmpty else { return }
        host.deliver(Self.notification(from: service, event), to: targets)
    }

    /// Sends items of a node to one entity, as notifications (the newest item when it comes online or subscribes).
    func sendItems(node: String, _ items: [StoredPubSubItem], payloads: Bool, from service: JID, to recipient: JID) {
        var message = Self.notification(from: service, Self.itemsEvent(node: node, items, payloads: payloads))
        message[attribute: "to"] = recipient.description
        host.route(message)
    }

    // MARK: State

    /// Runs one change to a service's nodes at a time, in arrival order.
    func exclusive(_ service: JID, _ work: @escaping @Sendable () async throws -> IQResponse) async throws -> IQResponse {
        let result: Result<IQResponse, any Error> = await withCheckedContinuation { continuation in
            serial.enqueue(service) {
                do { continuation.resume(returning: .success(try await work())) } catch { continuation.resume(returning: .failure(error)) }
            }
        }
        return try result.get()
    }

    /// Reads a node its owner asks about.
    private func owned(_ request: XMLElement, by requester: JID, service: JID,
                       _ answer: @escaping @Sendable (String, CachedNode) async throws -> IQResponse) async throws -> IQResponse {
        guard let name = request[attribute: "node"] else { return PubSubNamespace.error(.badRequest, "nodeid-required") }
        guard let node = try await nodes(of: service)[name] else { return .error(.itemNotFound) }
        guard affiliation(of: requester, service: service, config: node.config) == "owner" else { return .error(.forbidden) }
        return try await answer(name, node)
    }

    /// Changes a node its owner names, one change to the service at a time.
    private func ownedChange(_ request: XMLElement, by requester: JID, service: JID,
                             _ change: @escaping @Sendable (String, CachedNode) async throws -> IQResponse) async throws -> IQResponse {
        try await exclusive(service) { [self] in try await owned(request, by: requester, service: service, change) }
    }

    /// A node's newest item with its payload (read from storage when the cache left it out).
    func newest(of node: CachedNode, name: String, service: JID) async throws -> StoredPubSubItem? {
        guard let last = node.last else { return nil }
        guard node.lastPayloadElided else { return last }
        return try await item(last.id, of: name, service: service)
    }

    /// One item of a node, straight from storage.
    func item(_ id: String, of node: String, service: JID) async throws -> StoredPubSubItem? {
        try await store.pubsubItems(of: node, service: service, ids: [id], limit: nil).first
    }

    func nodes(of service: JID) async throws -> [String: CachedNode] {
        try await cache.nodes(of: service) { [store, rules] in
            var nodes: [String: CachedNode] = [:]
            let subscriptions = rules.subscriptions ? try await store.pubsubSubscriptions(of: service) : [:]
            for node in try await store.pubsubNodes(of: service) {
                nodes[node.name] = CachedNode(
                    config: node.config, last: try await store.pubsubItems(of: node.name, service: service, ids: nil, limit: 1).first,
                    subscriptions: Dictionary(uniqueKeysWithValues: (subscriptions[node.name] ?? []).map { ($0.jid, $0.state) }))
            }
            return nodes
        }
    }

    /// Records a change here and tells the other nodes of a cluster to read the service's nodes again.
    func changed(_ service: JID, _ change: (inout [String: CachedNode]) -> Void) {
        cache.update(service, change)
        host.broadcastToCluster(XMLElement(name: "changed", namespace: clusterNamespace, attributes: ["service": service.description]))
    }

    /// Takes another node's `changed` message; false when it is not one.
    func clusterMessage(_ message: XMLElement) -> Bool {
        guard message.namespace == clusterNamespace, message.name == "changed" else { return false }
        if let service = message[attribute: "service"].flatMap({ JID($0) }) { cache.drop(service) }
        return true
    }

    /// Forgets what is cached of a service (an account created again under a deleted one's name).
    func forget(_ service: JID) { cache.drop(service) }

    // MARK: Elements

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

    static func notification(from service: JID, _ content: XMLElement) -> XMLElement {
        var message = XMLElement(name: "message", namespace: Namespace.client,
                                 attributes: ["from": service.description, "type": "headline", "id": UUID().uuidString.lowercased()])
        message.append(XMLElement(name: "event", namespace: PubSubNamespace.event).appending(content))
        return message
    }
}

extension XMLElement {
    func appending(_ child: XMLElement) -> XMLElement {
        var copy = self
        copy.append(child)
        return copy
    }
}
