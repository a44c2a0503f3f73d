import StarlingAPI
import StarlingStorage
import Synchronization

/// XEP-0191: a blocked entity gets nothing from the account (not even presence), and nothing it sends
/// reaches the account. Blocklists of accounts with a session are kept in memory so the checks on
/// the stanza path never wait for storage.
public final class BlockingModule: ServerModule {
    public static let namespace = "urn:xmpp:blocking"
    public static let errorsNamespace = "urn:xmpp:blocking:errors"
    public static let descriptor = ModuleDescriptor(
        name: "blocking", summary: "Blocks unwanted contacts.", xeps: ["XEP-0191"],
        options: [ModuleOptionSpec("max_items", .integer(1...100_000), default: .integer(1000), doc: "Entries one blocklist may hold.")]
    )

    private let host: any ModuleHost
    private let store: any BlocklistStore
    private let maxItems: Int
    /// Blocklists of accounts with a session here, by bare JID.
    private let lists = ShardedDictionary<JID, Set<JID>>()
    /// How many of `lists` are non-empty: while none is, stanzas pass without their addresses parsed.
    private let nonEmptyLists = Atomic<Int>(0)
    /// The session flag of resources that fetched their blocklist and so get pushes, on any node.
    static let flag = "blocklist"
    /// What this module tells its peers on other nodes.
    static let clusterNamespace = "urn:starling:cluster:blocking"
    private let queue = KeyedSerialQueue()
    /// Another module changed an account's blocklist in storage (privacy lists edit it as a list).
    public static let listChanged = HookPoint<BlocklistChangedEvent>("blocklist-changed")

    public init(host: any ModuleHost) throws {
        self.host = host
        store = try host.require((any BlocklistStore).self, "blocklist storage")
        maxItems = host.options.integer("max_items")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .both)
        registrar.iq(.get, "blocklist", Self.namespace, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            host.setFlag(Self.flag, true, for: request.from)
            let items = try await load(request.to)
            var list = XMLElement(name: "blocklist", namespace: Self.namespace)
            for item in items.sorted(by: { $0.description < $1.description }) {
                list.append(XMLElement(name: "item", namespace: Self.namespace, attributes: ["jid": item.description]))
            }
            return .result(list)
        }
        registrar.iq(.set, "block", Self.namespace, target: .account) { [self] request in
            try await change(request, block: true)
        }
        registrar.iq(.set, "unblock", Self.namespace, target: .account) { [self] request in
            try await change(request, block: false)
        }
        // Outbound: the account cannot reach whom it blocked.
        registrar.hook(.stanzaFromClient, priority: 1000) { [self] event in
            guard nonEmptyLists.load(ordering: .relaxed) > 0,
                  let origin = event.origin, let to = event.stanza[attribute: "to"].flatMap({ JID($0) }),
                  isBlocked(to, by: origin.bare) else { return .pass }
            if event.stanza.name == "presence" { return .handled }
            // XEP-0191 §3.5: the error says why, so clients can offer to unblock.
            return .refuse(StanzaError(.notAcceptable, application: XMLElement(name: "blocked", namespace: Self.errorsNamespace),
                                       text: "you have blocked this contact"))
        }
        // Inbound: nothing from a blocked entity reaches the account; and what the server sends on an
        // account's behalf (presence broadcasts, probes answers) never reaches whom it blocked.
        registrar.hook(.stanzaToUser, priority: 1000) { [self] event in
            guard nonEmptyLists.load(ordering: .relaxed) > 0,
                  let recipient = event.recipient, let from = event.stanza[attribute: "from"].flatMap({ JID($0) }),
                  from.bare != recipient.bare else { return .pass }
            if isBlocked(from, by: recipient.bare) { return .reject(.serviceUnavailable, text: nil) }
            // Unavailable presence still goes out: it is how the blocked learn we are gone (§3.3.4).
            let isUnavailable = event.stanza.name == "presence" && event.stanza[attribute: "type"] == "unavailable"
            if from.localpart != nil, !isUnavailable, isBlocked(recipient, by: from.bare) { return .handled }
            return .pass
        }
        // A message from a blocked entity is refused before anything else takes it (the archive, offline
        // storage); delivery-time screening above still covers lists loaded later.
        registrar.hook(.messageToAccount, priority: 1000) { [self] event in
            guard nonEmptyLists.load(ordering: .relaxed) > 0, let recipient = event.recipient,
                  let from = event.stanza[attribute: "from"].flatMap({ JID($0) }), from.bare != recipient.bare,
                  isBlocked(from, by: recipient.bare) else { return .pass }
            return .reject(.serviceUnavailable, text: nil)
        }
        // A list changed on another node: this node's copy, if it keeps one, is read again.
        registrar.hook(.clusterMessage) { [self] event in
            guard event.message.name == "changed", event.message.namespace == Self.clusterNamespace,
                  let user = event.message[attribute: "jid"].flatMap({ JID($0) }), lists[user] != nil else { return .pass }
            queue.enqueue(user) { [self] in
                guard let items = try? await store.blocklist(of: user) else { return }
                update(user) { $0 = Set(items) }
            }
            return .handled
        }
        // Read when the account's first session here binds, or arrives resumed from another node.
        let loadAccount: @Sendable (JID) -> Void = { [self] session in
            let user = session.bare
            queue.enqueue(user) { _ = try? await self.load(user) }
        }
        registrar.hook(.sessionBound) { event in
            loadAccount(event.jid)
            return .pass
        }
        registrar.hook(.sessionArrived) { event in
            loadAccount(event.jid)
            return .pass
        }
        // Applied before the change is answered, so the account's next request sees it.
        registrar.hook(Self.listChanged) { [self] event in
            let user = event.user.bare
            let previous = lists[user]
            update(user) { if $0 != nil { $0 = event.items } }
            host.broadcastToCluster(XMLElement(name: "changed", namespace: Self.clusterNamespace, attributes: ["jid": user.description]))
            // Without a session here there is no cached list to compare with, and nobody here to tell.
            guard let previous else { return .pass }
            let blocked = Array(event.items.subtracting(previous)), unblocked = Array(previous.subtracting(event.items))
            if !blocked.isEmpty {
                disappear(from: blocked, user: user)
                push(blocked, block: true, of: user)
            }
            if !unblocked.isEmpty { push(unblocked, block: false, of: user) }
            return .pass
        }
        // What is kept per session here goes when it ends, or when it moves to another node of the cluster.
        let forgetSession: @Sendable (SessionEvent) -> HookResult = { [self] event in
            // The cached list is this node's, kept while the account has a session here.
            if !host.resources(of: event.jid.bare).contains(where: \.isLocal) { update(event.jid.bare) { $0 = nil } }
            return .pass
        }
        registrar.hook(.sessionClosed, forgetSession)
        registrar.hook(.sessionMoved, forgetSession)
    }

    /// XEP-0191 §3.3.2 / XEP-0016 matching: full JID, bare JID, domain/resource or domain.
    private func isBlocked(_ entity: JID, by user: JID) -> Bool {
        guard let list = lists[user], !list.isEmpty else { return false }
        if list.contains(entity) || list.contains(entity.bare) || list.contains(entity.domain) { return true }
        if let resource = entity.resourcepart, let domainResource = try? entity.domain.with(resource: resource) {
            return list.contains(domainResource)
        }
        return false
    }

    /// Changes a cached list, keeping `nonEmptyLists` in step.
    private func update(_ user: JID, _ change: (inout Set<JID>?) -> Void) {
        lists.withValue(for: user) { list in
            let wasEmpty = list?.isEmpty ?? true
            change(&list)
            let isEmpty = list?.isEmpty ?? true
            if wasEmpty != isEmpty { nonEmptyLists.add(isEmpty ? -1 : 1, ordering: .relaxed) }
        }
    }

    private func load(_ user: JID) async throws -> Set<JID> {
        if let cached = lists[user] { return cached }
        let items = Set(try await store.blocklist(of: user))
        update(user) { $0 = items }
        return items
    }

    private func change(_ request: IQRequest, block: Bool) async throws -> IQResponse {
        guard request.from.bare == request.to else { return .error(.forbidden) }
        var items: [JID] = []
        for item in request.payload.elements where item.name == "item" {
            guard let text = item[attribute: "jid"], let jid = JID(text) else { return .error(.jidMalformed) }
            items.append(jid)
        }
        if block && items.isEmpty { return .error(.badRequest, text: "block at least one item") }
        let user = request.to
        let (store, maxItems) = (self.store, self.maxItems)
        let current = try await load(user)
        if block, current.union(items).count > maxItems { return .error(.resourceConstraint, text: "the blocklist is full") }
        if block { try await store.block(items, for: user) } else { try await store.unblock(items, for: user) }
        update(user) { list in
            if block { list = (list ?? []).union(items) } else if items.isEmpty { list = [] } else { list?.subtract(items) }
        }
        host.broadcastToCluster(XMLElement(name: "changed", namespace: Self.clusterNamespace, attributes: ["jid": user.description]))
        if block { disappear(from: items, user: user) }
        push(items, block: block, of: user)
        return .result(nil)
    }

    /// The blocked stop seeing us at once (XEP-0191 §3.3.4).
    private func disappear(from items: [JID], user: JID) {
        for resource in host.resources(of: user) where resource.available {
            for item in items {
                host.route(XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                    "type": "unavailable", "from": resource.jid.description, "to": item.description,
                ]))
            }
        }
    }

    /// Tells every resource that fetched the blocklist what changed.
    private func push(_ items: [JID], block: Bool, of user: JID) {
        let targets = host.resources(of: user).filter { $0.flags.contains(Self.flag) }.map(\.jid)
        for target in targets {
            var payload = XMLElement(name: block ? "block" : "unblock", namespace: Self.namespace)
            for item in items { payload.append(XMLElement(name: "item", namespace: Self.namespace, attributes: ["jid": item.description])) }
            var push = XMLElement(name: "iq", namespace: Namespace.client, attributes: [
                "type": "set", "id": "block-push-\(UInt32.random(in: 0...UInt32.max))", "to": target.description,
            ])
            push.append(payload)
            host.route(push)
        }
    }
}

/// An account's blocklist as another module just stored it (see `BlockingModule.listChanged`).
public struct BlocklistChangedEvent: Sendable {
    /// The account's bare JID.
    public let user: JID
    public let items: Set<JID>

    public init(user: JID, items: Set<JID>) {
        self.user = user
        self.items = items
    }
}
