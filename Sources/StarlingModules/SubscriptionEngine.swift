import Foundation
import StarlingAPI
import StarlingStorage
import Synchronization

/// Presence subscriptions (RFC 6121 §3) and presence broadcast (§4) for local accounts, shared by the
/// roster and presence modules of one host. Every change to an account's roster runs on that
/// account's serial queue; the contact's side of a subscription change is queued on the contact's.
final class SubscriptionEngine: Sendable {
    private static let instances = Mutex<[String: SubscriptionEngine]>([:])

    /// The engine of `host`'s domain, created on first use.
    static func shared(host: any ModuleHost, store: any RosterStore) -> SubscriptionEngine {
        instances.withLock { instances in
            if let existing = instances[host.domain] { return existing }
            let engine = SubscriptionEngine(host: host, store: store)
            instances[host.domain] = engine
            return engine
        }
    }

    /// The session flag of resources that fetched the roster and so get pushes (RFC 6121 §2.1.6), on
    /// whichever node they are bound.
    static let rosterFlag = "roster"

    private struct State {
        /// The last available presence of each available resource of this node.
        var presence: [JID: XMLElement] = [:]
        /// Where each resource sent directed presence, to tell them when it goes away (§4.6.3).
        var directed: [JID: Set<JID>] = [:]
    }

    let host: any ModuleHost
    let store: any RosterStore
    private let state = Mutex(State())
    private let queue = KeyedSerialQueue()

    private init(host: any ModuleHost, store: any RosterStore) {
        self.host = host
        self.store = store
    }

    // MARK: Serialization

    /// Runs `work` on `user`'s queue and returns its result.
    func serialized<T: Sendable>(for user: JID, _ work: @escaping @Sendable () async throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.enqueue(user.bare) {
                do { continuation.resume(returning: try await work()) } catch { continuation.resume(throwing: error) }
            }
        }
    }

    /// Queues `work` on `user`'s queue without waiting; failures are logged.
    func enqueue(for user: JID, _ what: String, _ work: @escaping @Sendable () async throws -> Void) {
        let host = self.host
        queue.enqueue(user.bare) {
            do { try await work() } catch { host.log(.error, "\(what) for \(user) failed: \(error)") }
        }
    }

    // MARK: Roster pushes

    func markInterested(_ resource: JID) { host.setFlag(Self.rosterFlag, true, for: resource) }

    func push(_ item: RosterItem, version: Int, to user: JID, removed: Bool = false) {
        _ = host.run(.rosterChanged, RosterChangeEvent(user: user.bare, contact: item.jid, subscription: removed ? "remove" : item.subscription.rawValue))
        let targets = host.resources(of: user.bare).filter { $0.flags.contains(Self.rosterFlag) }.map(\.jid)
        for resource in targets {
            var query = XMLElement(name: "query", namespace: RosterModule.namespace, attributes: ["ver": String(version)])
            query.append(RosterModule.element(for: item, removed: removed))
            var push = XMLElement(name: "iq", namespace: Namespace.client, attributes: [
                "type": "set", "id": "push-\(UInt32.random(in: 0...UInt32.max))", "to": resource.description,
            ])
            push.append(query)
            host.route(push)
        }
    }

    private func save(_ item: RosterItem, of user: JID) async throws {
        let version = try await store.put(item, for: user)
        push(item, version: version, to: user)
    }

    // MARK: Outbound subscription stanzas (the sender's side), run on the sender's queue

    /// Handles `<presence type='subscribe|subscribed|unsubscribe|unsubscribed'/>` from a local user.
    func outbound(_ type: String, from user: JID, to contact: JID, stanza: XMLElement) {
        let user = user.bare, contact = contact.bare
        guard user != contact else { return }
        enqueue(for: user, "outbound \(type)") { [self] in
            let existing = try await store.item(of: user, contact: contact)
            var item = existing ?? RosterItem(jid: contact)
            var deliver = true
            switch type {
            case "subscribe":
                if !item.subscription.userReceivesPresence && !item.askSubscribe {
                    item.askSubscribe = true
                    try await save(item, of: user)
                }
            case "subscribed":
                let pending = try await store.pendingSubscriptions(to: user).contains { $0.contact == contact }
                if pending {
                    item.subscription = item.subscription == .to ? .both : (item.subscription == .none ? .from : item.subscription)
                    item.preApproved = false
                    try await store.removePendingSubscription(from: contact, to: user)
                    try await save(item, of: user)
                    sendCurrentPresence(of: user, to: contact)
                } else if !item.subscription.contactReceivesPresence && !item.preApproved {
                    // Pre-approval (RFC 6121 §3.4): remembered, not delivered.
                    item.preApproved = true
                    try await save(item, of: user)
                    deliver = false
                } else {
                    deliver = false
                }
            case "unsubscribe":
                if item.subscription.userReceivesPresence || item.askSubscribe {
                    item.subscription = item.subscription == .both ? .from : (item.subscription == .to ? .none : item.subscription)
                    item.askSubscribe = false
                    if existing != nil { try await save(item, of: user) }
                }
            case "unsubscribed":
                try await store.removePendingSubscription(from: contact, to: user)
                if item.subscription.contactReceivesPresence || item.preApproved {
                    item.subscription = item.subscription == .both ? .to : (item.subscription == .from ? .none : item.subscription)
                    item.preApproved = false
                    if existing != nil { try await save(item, of: user) }
                    sendUnavailable(of: user, to: contact)
                }
            default:
                return
            }
            if deliver {
                var routed = stanza
                routed[attribute: "from"] = user.description
                routed[attribute: "to"] = contact.description
                inbound(type, from: user, to: contact, stanza: routed)
            }
        }
    }

    // MARK: Inbound subscription stanzas (the contact's side), run on the contact's queue

    /// - Note: `contact` of another domain: the stanza goes there (over s2s), whose server does this part.
    func inbound(_ type: String, from user: JID, to contact: JID, stanza: XMLElement) {
        guard host.isLocal(contact.domainpart) else {
            var routed = stanza
            routed[attribute: "from"] = user.bare.description
            routed[attribute: "to"] = contact.bare.description
            host.route(routed)
            return
        }
        enqueue(for: contact, "inbound \(type)") { [self] in
            let existing = try await store.item(of: contact, contact: user)
            var item = existing ?? RosterItem(jid: user)
            switch type {
            case "subscribe":
                if item.subscription.contactReceivesPresence {
                    // Already subscribed: answer for the contact (RFC 6121 §3.1.3).
                    autoReply("subscribed", from: contact, to: user)
                } else if item.preApproved {
                    item.subscription = item.subscription == .to ? .both : .from
                    item.preApproved = false
                    try await save(item, of: contact)
                    autoReply("subscribed", from: contact, to: user)
                    sendCurrentPresence(of: contact, to: user)
                } else {
                    try await store.addPendingSubscription(from: user, to: contact, stanza: stanza.serialized(inheritedNamespace: Namespace.client))
                    deliverToAvailable(stanza, of: contact)
                }
            case "subscribed":
                guard let existing, existing.askSubscribe else { return }
                item.subscription = item.subscription == .from ? .both : .to
                item.askSubscribe = false
                try await save(item, of: contact)
                deliverToAvailable(stanza, of: contact)
                // The approver's presence follows from the approver's side (sendCurrentPresence).
            case "unsubscribe":
                try await store.removePendingSubscription(from: user, to: contact)
                guard existing != nil, item.subscription.contactReceivesPresence else { return }
                item.subscription = item.subscription == .both ? .to : .none
                try await save(item, of: contact)
                deliverToAvailable(stanza, of: contact)
                sendUnavailable(of: contact, to: user)
            case "unsubscribed":
                guard existing != nil, item.subscription.userReceivesPresence || item.askSubscribe else { return }
                item.subscription = item.subscription == .both ? .from : .none
                item.askSubscribe = false
                try await save(item, of: contact)
                deliverToAvailable(stanza, of: contact)
            default:
                return
            }
        }
    }

    /// A subscription answer the server gives on an account's behalf, processed as if it had sent it.
    private func autoReply(_ type: String, from contact: JID, to user: JID) {
        let reply = XMLElement(name: "presence", namespace: Namespace.client, attributes: [
            "type": type, "from": contact.description, "to": user.description,
        ])
        inbound(type, from: contact, to: user, stanza: reply)
    }

    /// Roster removal (RFC 6121 §2.5.2): cancel both directions, then drop the item. Runs on the user's queue.
    func removeContact(_ contact: JID, of user: JID) async throws -> Bool {
        guard let item = try await store.item(of: user, contact: contact) else { return false }
        if item.subscription.userReceivesPresence || item.askSubscribe {
            inbound("unsubscribe", from: user, to: contact, stanza: XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                "type": "unsubscribe", "from": user.description, "to": contact.description,
            ]))
        }
        if item.subscription.contactReceivesPresence {
            sendUnavailable(of: user, to: contact)
            inbound("unsubscribed", from: user, to: contact, stanza: XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                "type": "unsubscribed", "from": user.description, "to": contact.description,
            ]))
        }
        try await store.removePendingSubscription(from: contact, to: user)
        let version = try await store.remove(contact: contact, for: user)
        push(item, version: version, to: user, removed: true)
        return true
    }

    // MARK: Presence broadcast

    /// Available or unavailable presence from a resource, without `to` (RFC 6121 §4.2–4.5).
    func broadcast(_ stanza: XMLElement, from resource: JID) {
        let available = stanza[attribute: "type"] == nil
        let priority = stanza.child("priority").flatMap { Int($0.text.trimmingCharacters(in: .whitespaces)) }.map { max(-128, min(127, $0)) } ?? 0
        let wasAvailable = state.withLock { state -> Bool in
            let was = state.presence[resource] != nil
            if available { state.presence[resource] = stanza } else { state.presence[resource] = nil }
            return was
        }
        // Into the session table (every node's) before any contact hears it: probes are answered from it.
        host.setPresence(available ? stanza : nil, of: resource)
        if !available && !wasAvailable { return }
        let user = resource.bare
        let directedTargets: Set<JID> = available ? [] : state.withLock { $0.directed.removeValue(forKey: resource) ?? [] }
        enqueue(for: user, "presence broadcast") { [self] in
            let items = try await store.roster(of: user).items
            var recipients = Set(items.filter { $0.subscription.contactReceivesPresence }.map(\.jid))
            recipients.formUnion(directedTargets.filter { host.isLocal($0.domainpart) })
            for recipient in recipients { deliverToAvailable(stanza, of: recipient, stamped: resource) }
            // Directed presence that went to another domain (a room's occupant JID) goes there as addressed.
            for target in directedTargets where !host.isLocal(target.domainpart) {
                var copy = stanza
                copy[attribute: "from"] = resource.description
                copy[attribute: "to"] = target.description
                host.route(copy)
            }
            // The user's other resources see it too.
            for other in host.resources(of: user) where other.jid != resource && other.available {
                var copy = stanza
                copy[attribute: "to"] = other.jid.description
                copy[attribute: "from"] = resource.description
                host.route(copy)
            }
            if available && !wasAvailable {
                if priority >= 0 { _ = host.run(.initialPresence, SessionEvent(jid: resource)) }
                // Initial presence: probe contacts (answered locally) and replay pending requests.
                for item in items where item.subscription.userReceivesPresence {
                    if !host.isLocal(item.jid.domainpart) {
                        // Another domain answers for its accounts (RFC 6121 §4.3).
                        host.route(XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                            "type": "probe", "from": user.description, "to": item.jid.bare.description,
                        ]))
                        continue
                    }
                    for (contactResource, presence) in currentPresence(of: item.jid) {
                        var copy = presence
                        copy[attribute: "from"] = contactResource.description
                        copy[attribute: "to"] = resource.description
                        host.route(copy)
                    }
                }
                for pending in try await store.pendingSubscriptions(to: user) {
                    var request = XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                        "type": "subscribe", "from": pending.contact.description, "to": resource.description,
                    ])
                    request[attribute: "id"] = nil
                    host.route(request)
                }
            }
        }
    }

    /// Directed presence (§4.6): remembered so going offline reaches the target too, and delivered when
    /// the target is a local account. Returns false for other domains, which the caller routes.
    func directed(_ stanza: XMLElement, from resource: JID, to target: JID) -> Bool {
        let available = stanza[attribute: "type"] == nil
        state.withLock { state in
            if available { state.directed[resource, default: []].insert(target) } else { state.directed[resource]?.remove(target) }
        }
        guard host.isLocal(target.domainpart) else { return false }
        if target.resourcepart != nil { host.route(stanza) } else { deliverToAvailable(stanza, of: target, stamped: resource) }
        return true
    }

    /// A probe from another domain (RFC 6121 §4.3.2): the current presence of `user`'s resources if
    /// `prober` is subscribed to it, unavailable if none is online; nothing if it is not subscribed.
    func answerProbe(from prober: JID, to user: JID) {
        enqueue(for: user, "presence probe") { [self] in
            guard try await store.item(of: user.bare, contact: prober.bare)?.subscription.contactReceivesPresence == true else { return }
            let current = currentPresence(of: user)
            if current.isEmpty {
                host.route(XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                    "type": "unavailable", "from": user.bare.description, "to": prober.description,
                ]))
            }
            for (resource, presence) in current {
                var copy = presence
                copy[attribute: "from"] = resource.description
                copy[attribute: "to"] = prober.description
                host.route(copy)
            }
        }
    }

    /// The resource went away without saying so: broadcast unavailable for it.
    func sessionClosed(_ resource: JID) {
        let wasAvailable = state.withLock { $0.presence[resource] != nil }
        guard wasAvailable else {
            _ = state.withLock { $0.directed.removeValue(forKey: resource) }
            return
        }
        broadcast(XMLElement(name: "presence", namespace: Namespace.client, attributes: ["type": "unavailable"]), from: resource)
    }

    /// Where `resource` sent directed presence, as the element that goes with the session when it
    /// continues on another node; nil if nowhere.
    func directedPresence(of resource: JID) -> XMLElement? {
        let targets = state.withLock { $0.directed[resource] ?? [] }
        guard !targets.isEmpty else { return nil }
        var element = XMLElement(name: "directed", namespace: Self.handoverNamespace)
        for target in targets.sorted(by: { $0.description < $1.description }) {
            element.append(XMLElement(name: "target", namespace: Self.handoverNamespace, attributes: ["jid": target.description]))
        }
        return element
    }

    /// The session came from another node with `carried` (`directedPresence(of:)` there): its directed
    /// presence targets are this node's to tell when it goes.
    func takeUpDirectedPresence(of resource: JID, from carried: [XMLElement]) {
        guard let element = carried.first(where: { $0.name == "directed" && $0.namespace == Self.handoverNamespace }) else { return }
        let targets = Set(element.elements.compactMap { $0.name == "target" ? $0[attribute: "jid"].flatMap { JID($0) } : nil })
        guard !targets.isEmpty else { return }
        state.withLock { $0.directed[resource, default: []].formUnion(targets) }
    }

    static let handoverNamespace = "urn:starling:presence:handover"

    /// The session continues on another node: what this node kept of its presence goes, unannounced.
    func sessionMoved(_ resource: JID) {
        state.withLock { state in
            state.presence[resource] = nil
            state.directed[resource] = nil
        }
    }

    /// The available resources of `user` on every node, with their presence (the session table's).
    private func currentPresence(of user: JID) -> [(JID, XMLElement)] {
        host.resources(of: user.bare).compactMap { resource in resource.available ? resource.presence.map { (resource.jid, $0) } : nil }
    }

    /// Another node's sessions were lost or came back (`ClusterSessionsEvent`): this node's own resources
    /// among their contacts (and of their own accounts) hear of it as they would have from the sessions.
    func clusterSessionsChanged(_ event: ClusterSessionsEvent) {
        let unavailable = XMLElement(name: "presence", namespace: Namespace.client, attributes: ["type": "unavailable"])
        var changes = event.lost.filter(\.available).map { ($0.jid, unavailable) }
        changes += event.restored.compactMap { resource in resource.available ? resource.presence.map { (resource.jid, $0) } : nil }
        for (resource, presence) in changes {
            enqueue(for: resource.bare, "presence of another node's session") { [self] in
                let items = try await store.roster(of: resource.bare).items
                var recipients = items.filter { $0.subscription.contactReceivesPresence }.map(\.jid)
                recipients.append(resource.bare)
                for recipient in recipients {
                    for target in host.resources(of: recipient) where target.isLocal && target.available && target.jid != resource {
                        var copy = presence
                        copy[attribute: "from"] = resource.description
                        copy[attribute: "to"] = target.jid.description
                        host.route(copy)
                    }
                }
            }
        }
    }

    private func sendCurrentPresence(of user: JID, to contact: JID) {
        for (resource, presence) in currentPresence(of: user) {
            deliverToAvailable(presence, of: contact, stamped: resource)
        }
    }

    private func sendUnavailable(of user: JID, to contact: JID) {
        for (resource, _) in currentPresence(of: user) {
            deliverToAvailable(XMLElement(name: "presence", namespace: Namespace.client, attributes: ["type": "unavailable"]), of: contact, stamped: resource)
        }
    }

    /// Delivers to each available resource of a local account, `from` set to `stamped` when given; an
    /// account of another domain gets it once, at its bare JID, and its server broadcasts it.
    func deliverToAvailable(_ stanza: XMLElement, of recipient: JID, stamped: JID? = nil) {
        guard host.isLocal(recipient.domainpart) else {
            var copy = stanza
            if let stamped { copy[attribute: "from"] = stamped.description }
            copy[attribute: "to"] = recipient.bare.description
            host.route(copy)
            return
        }
        for resource in host.resources(of: recipient.bare) where resource.available {
            var copy = stanza
            if let stamped { copy[attribute: "from"] = stamped.description }
            copy[attribute: "to"] = resource.jid.description
            host.route(copy)
        }
    }
}
