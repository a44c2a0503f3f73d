import StarlingAPI
import StarlingStorage
import Synchronization

/// XEP-0191: a blocked entity gets nothing from the account (not even presence), and nothing it sends
/// reaches the account. Blocklists of accounts with a session are kept in memory so the checks on
/// the stanza path never wait for storage.
public final class BlockingModule: ServerModule {
    public static let namespace = "urn:xmpp:blocking"
    public static let descriptor = ModuleDescriptor(
        name: "blocking", summary: "Blocks unwanted contacts.", xeps: ["XEP-0191"],
        options: [ModuleOptionSpec("max_items", .integer(1...100_000), default: .integer(1000), doc: "Entries one blocklist may hold.")]
    )

    private let host: any ModuleHost
    private let store: any BlocklistStore
    private let maxItems: Int
    private let lists = Mutex<[JID: Set<JID>]>([:])
    private let interested = Mutex<Set<JID>>([])
    private let queue = KeyedSerialQueue()

    public init(host: any ModuleHost) throws {
        self.host = host
        store = try host.require((any BlocklistStore).self, "blocklist storage")
        maxItems = host.options.integer("max_items")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .both)
        registrar.iq(.get, "blocklist", Self.namespace, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            interested.withLock { _ = $0.insert(request.from) }
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
            guard let origin = event.origin, let to = event.stanza[attribute: "to"].flatMap({ JID($0) }),
                  isBlocked(to, by: origin.bare) else { return .pass }
            if event.stanza.name == "presence" { return .handled }
            return .reject(.notAcceptable, text: "you have blocked this contact")
        }
        // Inbound: nothing from a blocked entity reaches the account; and what the server sends on an
        // account's behalf (presence broadcasts, probes answers) never reaches whom it blocked.
        registrar.hook(.stanzaToUser, priority: 1000) { [self] event in
            guard let recipient = event.recipient, let from = event.stanza[attribute: "from"].flatMap({ JID($0) }),
                  from.bare != recipient.bare else { return .pass }
            if isBlocked(from, by: recipient.bare) { return .reject(.serviceUnavailable, text: nil) }
            // Unavailable presence still goes out: it is how the blocked learn we are gone (§3.3.4).
            let isUnavailable = event.stanza.name == "presence" && event.stanza[attribute: "type"] == "unavailable"
            if from.localpart != nil, !isUnavailable, isBlocked(recipient, by: from.bare) { return .handled }
            return .pass
        }
        registrar.hook(.sessionBound) { [self] event in
            let user = event.jid.bare
            queue.enqueue(user) { _ = try? await self.load(user) }
            return .pass
        }
        registrar.hook(.sessionClosed) { [self] event in
            interested.withLock { _ = $0.remove(event.jid) }
            if host.resources(of: event.jid.bare).isEmpty { lists.withLock { _ = $0.removeValue(forKey: event.jid.bare) } }
            return .pass
        }
    }

    /// XEP-0191 §3.3.2 / XEP-0016 matching: full JID, bare JID, domain/resource or domain.
    private func isBlocked(_ entity: JID, by user: JID) -> Bool {
        lists.withLock { lists in
            guard let list = lists[user], !list.isEmpty else { return false }
            if list.contains(entity) || list.contains(entity.bare) || list.contains(entity.domain) { return true }
            if let resource = entity.resourcepart, let domainResource = try? entity.domain.with(resource: resource) {
                return list.contains(domainResource)
            }
            return false
        }
    }

    private func load(_ user: JID) async throws -> Set<JID> {
        if let cached = lists.withLock({ $0[user] }) { return cached }
        let items = Set(try await store.blocklist(of: user))
        lists.withLock { $0[user] = items }
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
        let (store, host, maxItems) = (self.store, self.host, self.maxItems)
        let current = try await load(user)
        if block, current.union(items).count > maxItems { return .error(.resourceConstraint, text: "the blocklist is full") }
        if block { try await store.block(items, for: user) } else { try await store.unblock(items, for: user) }
        lists.withLock { lists in
            if block { lists[user, default: []].formUnion(items) } else if items.isEmpty { lists[user] = [] } else { lists[user]?.subtract(items) }
        }
        if block {
            // The blocked stop seeing us at once (XEP-0191 §3.3.4).
            for resource in host.resources(of: user) where resource.available {
                for item in items {
                    host.route(XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                        "type": "unavailable", "from": resource.jid.description, "to": item.description,
                    ]))
                }
            }
        }
        // Push the change to every resource that fetched the blocklist.
        let targets = interested.withLock { $0.filter { $0.bare == user } }
        for target in targets {
            var payload = XMLElement(name: block ? "block" : "unblock", namespace: Self.namespace)
            for item in items { payload.append(XMLElement(name: "item", namespace: Self.namespace, attributes: ["jid": item.description])) }
            var push = XMLElement(name: "iq", namespace: Namespace.client, attributes: [
                "type": "set", "id": "block-push-\(UInt32.random(in: 0...UInt32.max))", "to": target.description,
            ])
            push.append(payload)
            host.route(push)
        }
        return .result(nil)
    }
}
