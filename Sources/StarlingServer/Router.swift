import Logging
import NIOConcurrencyHelpers
import StarlingAPI
import StarlingXML
import StarlingCluster
import StarlingConfig
import StarlingS2S

/// Every host's module tables, one immutable value.
final class ModuleTables: Sendable {
    let hosts: [String: HostModules]
    /// Component domains (a MUC service's, say) → the handler the module registered.
    let components: [String: ComponentRegistration]
    /// Component domains → the host whose module registered them.
    let componentHosts: [String: String]

    /// Fails when two modules claim one component domain, or a component claims a served host.
    init(_ hosts: [String: HostModules]) throws {
        var components: [String: (host: String, registration: ComponentRegistration)] = [:]
        for (domain, host) in hosts.sorted(by: { $0.key < $1.key }) {
            for registration in host.components {
                let component = registration.info.domain
                if hosts[component] != nil {
                    throw ModuleError("\(component) is a host of this server: it cannot also be a component of \(domain)")
                }
                if let existing = components[component] {
                    throw ModuleError("\(component) is claimed as a component by both \(existing.host) and \(domain)")
                }
                components[component] = (domain, registration)
            }
        }
        self.hosts = hosts
        self.components = components.mapValues(\.registration)
        componentHosts = components.mapValues(\.host)
    }

    static let empty = try! ModuleTables([:])
}

/// The claims table as routing reads it: an immutable copy per change.
final class ComponentOwners: Sendable {
    let table: [String: ComponentClaims.Claim]
    init(_ table: [String: ComponentClaims.Claim]) { self.table = table }
}

/// Who a stanza being routed came from: a session on this node, or (for a stanza another node forwarded
/// here) an address that errors are routed back to.
enum Origin {
    case session(ClientSession)
    case address(JID)

    var jid: JID {
        switch self {
        case .session(let session): return session.jid
        case .address(let jid): return jid
        }
    }
}

/// Stanza routing (RFC 6120 §10, RFC 6121 §8) between bound sessions, on this node and, in a cluster,
/// through the node links to sessions on other nodes (the replicated session table says where each is
/// bound). Runs on the sending session's event loop; deliveries hop to the recipient's loop.
public final class Router: @unchecked Sendable {
    let registry: SessionRegistry
    let hosts: Set<String>
    let logger: Logger
    /// This node's cluster membership, if it is clustered.
    let cluster: ClusterNode?
    /// Per host. Replaced as a whole when a module is reloaded; reads take no lock (see `Swappable`).
    private let tables = Swappable(ModuleTables.empty)
    var modules: [String: HostModules] { tables.current.hosts }
    var components: [String: ComponentRegistration] { tables.current.components }
    /// Which node serves each component domain, in a cluster. Read lock-free on every stanza to a
    /// component; changed (under `claims`) only when a node claims a domain or is lost.
    private let owners = Swappable(ComponentOwners([:]))
    private let claims: NIOLockedValueBox<ComponentClaims>
    /// The access rules in effect (see `AccessPolicy`).
    let access: NIOLockedValueBox<AccessPolicy>
    /// Federation, when an s2s listener is configured. Set once at start, before any stream opens.
    var federation: Federation?

    init(registry: SessionRegistry, configuration: StarlingConfiguration, logger: Logger, cluster: ClusterNode? = nil) {
        self.registry = registry
        hosts = Set(configuration.hosts)
        access = NIOLockedValueBox(AccessPolicy(configuration))
        self.logger = logger
        self.cluster = cluster
        claims = NIOLockedValueBox(ComponentClaims(node: cluster?.name ?? ""))
    }

    func install(modules: [String: HostModules]) throws {
        tables.replace(try ModuleTables(modules))
    }

    /// Swaps in new tables for some hosts; events already running finish on the old ones.
    func replace(_ hosts: [String: HostModules]) throws {
        tables.replace(try ModuleTables(modules.merging(hosts) { $1 }))
    }

    /// Closes the session of a full JID, or every session of a bare one, on whichever node holds it; returns how many.
    @discardableResult
    func closeSessions(of jid: JID, _ condition: StreamErrorCondition) -> Int {
        let resources = registry.resources(of: jid.bare).filter { jid.resourcepart == nil || $0.jid == jid }
        for resource in resources {
            switch resource.location {
            case .local(let session): session.close(condition)
            case .remote(let node): cluster?.send(.closeSession(resource.jid, condition: condition.rawValue), to: node)
            }
        }
        return resources.count
    }

    /// Runs a hook on `domain`'s modules.
    func run<Event>(_ point: HookPoint<Event>, _ event: Event, on domain: String) -> HookResult {
        modules[domain]?.run(point, event) ?? .pass
    }

    /// Routes a stanza whose `from` the c2s layer has stamped with `sender`'s full JID.
    public func route(_ stanza: XMLElement, from sender: ClientSession) {
        var stanza = stanza
        guard proceeds(run(.stanzaFromClient, StanzaEvent(stanza: stanza, origin: sender.jid), on: sender.jid.domainpart), &stanza, origin: .session(sender)) else {
            return
        }
        let kind = StanzaKind(rawValue: stanza.name)!
        let to = stanza[attribute: "to"].flatMap { JID($0) }
        if kind == .presence && to == nil {
            // Reached without a presence module to take it (which records it itself, as broadcast).
            recordOwnPresence(stanza, sender: sender)
            return
        }
        // No `to` means the sender's own account (RFC 6120 §10.3).
        let target = to ?? sender.jid.bare
        guard hosts.contains(target.domainpart) else {
            if let component = components[target.domainpart] {
                toComponent(ComponentStanza(stanza: stanza, from: sender.jid, to: target), component)
                return
            }
            stanza[attribute: "to"] = target.description
            toRemote(stanza, origin: .session(sender))
            return
        }
        if kind == .message && target.localpart != nil,
           !proceeds(run(.messageToAccount, StanzaEvent(stanza: stanza, origin: sender.jid, recipient: target), on: target.domainpart), &stanza, origin: .session(sender)) {
            return
        }
        if target.localpart == nil {
            if kind == .iq { handleServerIQ(stanza, target: target, origin: .session(sender)) }
        } else if target.resourcepart != nil {
            toFullJID(stanza, kind: kind, target: target, origin: .session(sender))
        } else {
            toBareJID(stanza, kind: kind, target: target, origin: .session(sender))
        }
    }

    /// Carries out a stanza hook's verdict; false when the stanza goes no further (taken, or refused and
    /// bounced to the sender).
    private func proceeds(_ result: HookResult, _ stanza: inout XMLElement, origin: Origin) -> Bool {
        switch result {
        case .pass:
            return true
        case .modify(let modified):
            stanza = modified
            return true
        case .handled:
            return false
        case .reject(let condition, let text):
            bounce(stanza, condition, text: text, to: origin)
            return false
        case .refuse(let error):
            bounce(stanza, error, to: origin)
            return false
        }
    }

    // MARK: Other domains (s2s)

    /// A stanza for another domain, `from` and `to` set: over federation, or bounced without it.
    private func toRemote(_ stanza: XMLElement, origin: Origin) {
        guard let federation, let to = stanza[attribute: "to"].flatMap({ JID($0) }) else {
            bounce(stanza, .remoteServerNotFound, text: "this server does not federate with other domains", to: origin)
            return
        }
        var stanza = stanza
        let local = origin.jid.domainpart
        guard proceeds(run(.stanzaToRemote, StanzaEvent(stanza: stanza, origin: origin.jid, recipient: to), on: tables.current.componentHosts[local] ?? local),
                       &stanza, origin: origin) else { return }
        federation.send(stanza, from: local, to: to.domainpart)
    }

    /// A stanza an authenticated remote domain sent to one of ours (the s2s stream checked both domains).
    func routeFromRemote(_ stanza: XMLElement) {
        guard let from = stanza[attribute: "from"].flatMap({ JID($0) }), let to = stanza[attribute: "to"].flatMap({ JID($0) }),
              let kind = StanzaKind(rawValue: stanza.name) else { return }
        let origin = Origin.address(from)
        if let component = components[to.domainpart] {
            toComponent(ComponentStanza(stanza: stanza, from: from, to: to), component)
            return
        }
        guard hosts.contains(to.domainpart) else { return bounce(stanza, .itemNotFound, to: origin) }
        var stanza = stanza
        guard proceeds(run(.stanzaFromRemote, StanzaEvent(stanza: stanza, origin: from, recipient: to), on: to.domainpart), &stanza, origin: origin) else { return }
        if kind == .message && to.localpart != nil,
           !proceeds(run(.messageToAccount, StanzaEvent(stanza: stanza, origin: from, recipient: to), on: to.domainpart), &stanza, origin: origin) {
            return
        }
        if to.localpart == nil {
            if kind == .iq { handleServerIQ(stanza, target: to, origin: origin) }
        } else if to.resourcepart != nil {
            toFullJID(stanza, kind: kind, target: to, origin: origin)
        } else {
            toBareJID(stanza, kind: kind, target: to, origin: origin)
        }
    }

    /// A stanza federation could not deliver: its local sender hears why.
    func undeliverable(_ stanza: XMLElement, _ failure: S2SFailure) {
        guard let from = stanza[attribute: "from"].flatMap({ JID($0) }) else { return }
        bounce(stanza, StanzaError(failure.condition, text: failure.reason), to: .address(from))
    }

    private func recordOwnPresence(_ stanza: XMLElement, sender: ClientSession) {
        switch stanza[attribute: "type"] {
        case nil: registry.setPresence(of: sender.jid, stanza, priority: Self.priority(stanza))
        case "unavailable": registry.setPresence(of: sender.jid, nil, priority: 0)
        default: break
        }
    }

    /// A presence's `<priority/>`, clamped to RFC 6121's range.
    static func priority(_ presence: XMLElement) -> Int {
        let priority = presence.child("priority").flatMap { Int($0.text.trimmingCharacters(in: .whitespaces)) } ?? 0
        return max(-128, min(127, priority))
    }

    /// IQs the server answers itself, for its domain or on behalf of an account's bare JID, through
    /// the enabled modules' handlers.
    private func handleServerIQ(_ iq: XMLElement, target: JID, origin: Origin) {
        let type = iq[attribute: "type"]
        guard let iqType = type.flatMap(IQType.init(rawValue:)), let payload = iq.elements.first else { return }
        let key = ModuleRegistrar.IQKey(type: iqType, name: payload.name, namespace: payload.namespace)
        guard let entry = modules[target.domainpart]?.iqHandlers[key],
              entry.target == .both || entry.target == (target.localpart == nil ? IQTarget.server : IQTarget.account),
              entry.fromRemote || isLocal(origin.jid.domainpart)
        else {
            bounce(iq, .serviceUnavailable, to: origin)
            return
        }
        let request = IQRequest(stanza: iq, from: origin.jid, to: target)
        let logger = self.logger
        Task {
            let reply: XMLElement
            do {
                switch try await entry.handler(request) {
                case .result(let payload):
                    reply = iq.iqResult(payload: payload)
                case .error(let condition, let text):
                    reply = iq.errorReply(condition, text: text)
                case .failure(let error):
                    reply = iq.errorReply(error)
                }
            } catch {
                logger.error("IQ handler failed", metadata: ["module": "\(entry.module)", "error": "\(error)"])
                reply = iq.errorReply(.internalServerError)
            }
            switch origin {
            case .session(let sender):
                sender.deliver(self.addressedReply(reply, to: sender, from: target))
            case .address(let requester):
                var addressed = reply
                addressed[attribute: "to"] = requester.description
                addressed[attribute: "from"] = target.description
                self.routeFromServer(addressed)
            }
        }
    }

    /// One of this server's hosts or component domains.
    func isLocal(_ domain: String) -> Bool { hosts.contains(domain) || components[domain] != nil }

    /// Delivers a stanza a module sends (roster pushes, offline messages, room traffic, ...) to local
    /// sessions or to a component.
    func routeFromServer(_ stanza: XMLElement) {
        guard let to = stanza[attribute: "to"].flatMap({ JID($0) }) else {
            logger.debug("dropping a module's stanza without a recipient")
            return
        }
        if let component = components[to.domainpart] {
            let from = stanza[attribute: "from"].flatMap { JID($0) } ?? to.domain
            toComponent(ComponentStanza(stanza: stanza, from: from, to: to), component)
            return
        }
        guard hosts.contains(to.domainpart) else {
            if let from = stanza[attribute: "from"].flatMap({ JID($0) }), isLocal(from.domainpart) {
                toRemote(stanza, origin: .address(from))
            } else {
                logger.debug("dropping a module's stanza for another domain without a local sender")
            }
            return
        }
        guard to.localpart != nil else {
            logger.debug("dropping a module's stanza without a local recipient")
            return
        }
        if to.resourcepart != nil {
            let resource = registry.resources(of: to.bare).first { $0.jid == to }
            if let resource, deliver(stanza, to: [resource]) > 0 { return }
            // A message whose resource is gone, or on a node that cannot be reached, is kept for the
            // account like any other it could not take (offline storage, if enabled).
            let type = stanza[attribute: "type"] ?? "normal"
            if resource?.session == nil, stanza.name == "message", type == "chat" || type == "normal", stanza.child("body") != nil {
                _ = run(.messageUndeliverable, StanzaEvent(stanza: stanza, origin: stanza[attribute: "from"].flatMap { JID($0) }, recipient: to.bare),
                        on: to.domainpart)
            }
            return
        }
        let available = registry.resources(of: to).filter(\.available)
        if stanza.name == "message" {
            let top = available.filter { $0.priority >= 0 }.map(\.priority).max()
            let delivered = deliver(stanza, to: available.filter { $0.priority == top })
            // Nobody online to take it (an invitation, an announcement): kept like a user's message would be.
            let type = stanza[attribute: "type"] ?? "normal"
            if delivered == 0, type == "chat" || type == "normal", stanza.child("body") != nil {
                _ = run(.messageUndeliverable, StanzaEvent(stanza: stanza, origin: stanza[attribute: "from"].flatMap { JID($0) }, recipient: to.bare),
                        on: to.domainpart)
            }
        } else {
            _ = deliver(stanza, to: available)
        }
    }

    // MARK: Components in a cluster

    /// Hands a stanza to the component, on the node that serves its domain (this one, without a cluster).
    private func toComponent(_ input: ComponentStanza, _ registration: ComponentRegistration) {
        guard let cluster else { return registration.handler(input) }
        let domain = registration.info.domain
        let owner = owners.current.table[domain] ?? claim(domain)
        if owner.node == cluster.name { return registration.handler(input) }
        if cluster.send(.component(input.stanza, from: input.from, to: input.to), to: owner.node) { return }
        // Its node is unreachable; once it counts as lost, another node claims the domain.
        let type = input.stanza[attribute: "type"]
        guard type != "error", type != "result" else { return }
        var reply = input.stanza.errorReply(.remoteServerTimeout, text: "the node serving \(domain) cannot be reached")
        reply[attribute: "from"] = input.to.description
        reply[attribute: "to"] = input.from.description
        routeFromServer(reply)
    }

    /// This node starts serving `domain` unless another node claimed it meanwhile.
    private func claim(_ domain: String) -> ComponentClaims.Claim {
        let (owner, new) = claims.withLockedValue { claims in
            let outcome = claims.claim(domain, at: SessionRegistry.now())
            if outcome.new { owners.replace(ComponentOwners(claims.table)) }
            return outcome
        }
        if new {
            logger.notice("serving a component for the cluster", metadata: ["component": "\(domain)"])
            cluster?.broadcast(.claim(domain, claimedAt: owner.claimedAt))
            announceComponent(.componentClaimed, domain)
        }
        return owner
    }

    /// Another node claims `domain` (see `ComponentClaims` for who wins).
    func applyClaim(_ domain: String, node: String, claimedAt: UInt64) {
        let outcome = claims.withLockedValue { claims in
            let outcome = claims.apply(domain, ComponentClaims.Claim(node: node, claimedAt: claimedAt))
            if case .accepted = outcome { owners.replace(ComponentOwners(claims.table)) }
            return outcome
        }
        switch outcome {
        case .accepted(releasedHere: true):
            logger.warning("another node claimed a component first; letting go", metadata: ["component": "\(domain)", "peer": "\(node)"])
            announceComponent(.componentReleased, domain)
        case .refused(let insist?):
            cluster?.send(.claim(domain, claimedAt: insist.claimedAt), to: node)
        case .accepted(releasedHere: false), .refused(insist: nil):
            break
        }
    }

    /// Forgets what `node` served (it was lost, or its snapshot follows).
    func dropClaims(of node: String) {
        claims.withLockedValue { claims in
            claims.drop(node: node)
            owners.replace(ComponentOwners(claims.table))
        }
    }

    /// The component domains this node serves, with when it claimed them.
    var localClaims: [(domain: String, claimedAt: UInt64)] { claims.withLockedValue { $0.local } }

    /// A stanza another node forwarded to a component this node serves.
    func deliverToComponent(_ stanza: XMLElement, from: JID, to: JID) {
        components[to.domainpart]?.handler(ComponentStanza(stanza: stanza, from: from, to: to))
    }

    private func announceComponent(_ point: HookPoint<ComponentEvent>, _ domain: String) {
        guard let host = tables.current.componentHosts[domain] else { return }
        _ = run(point, ComponentEvent(domain: domain), on: host)
    }

    /// Delivers `stanza` as it is to each resource, wherever it is bound: local ones directly, remote
    /// ones with one frame per node. Returns how many could be reached (a node whose link is down cannot).
    private func deliver(_ stanza: XMLElement, to resources: [ResourceState]) -> Int {
        var reached = 0
        var remote: [String: [JID]] = [:]
        for resource in resources {
            switch resource.location {
            case .local(let session):
                deliverLocal(stanza, to: session)
                reached += 1
            case .remote(let node):
                remote[node, default: []].append(resource.jid)
            }
        }
        for (node, recipients) in remote where cluster?.send(.deliver(stanza, recipients: recipients, addressed: false), to: node) == true {
            reached += recipients.count
        }
        return reached
    }

    /// A stanza another node routed to sessions here. A recipient that is no longer bound here is routed
    /// as a full JID without a session (RFC 6121 §8.5.3.2), among this node's own sessions only: one hop
    /// per stanza, so nodes whose tables disagree for a moment cannot pass it back and forth.
    func deliverForwarded(_ stanza: XMLElement, to recipients: [JID], addressed: Bool) {
        if addressed {
            deliver(stanza, to: recipients, forwarded: true)
            return
        }
        for recipient in recipients {
            if let session = registry.localSession(recipient) {
                deliverLocal(stanza, to: session)
                continue
            }
            guard let kind = StanzaKind(rawValue: stanza.name) else { continue }
            let origin = stanza[attribute: "from"].flatMap { JID($0) }.map(Origin.address)
            switch kind {
            case .message:
                let type = stanza[attribute: "type"] ?? "normal"
                guard type == "chat" || type == "normal" else { continue }
                if let origin { toBareJID(stanza, kind: .message, target: recipient.bare, origin: origin, localOnly: true) }
            case .iq:
                if let origin { bounce(stanza, .serviceUnavailable, to: origin) }
            case .presence:
                continue
            }
        }
    }

    private func toFullJID(_ stanza: XMLElement, kind: StanzaKind, target: JID, origin: Origin) {
        switch registry.location(of: target) {
        case .local(let session)?:
            deliverLocal(stanza, to: session)
            return
        case .remote(let node)?:
            // A node that cannot be reached is treated like a resource that is not bound: the message goes
            // to the account's other resources or to offline storage, never guessed onto the wrong node.
            if cluster?.send(.deliver(stanza, recipients: [target], addressed: false), to: node) == true { return }
        case nil:
            break
        }
        // RFC 6121 §8.5.3.2: no such resource.
        switch kind {
        case .message:
            let type = stanza[attribute: "type"] ?? "normal"
            if type == "groupchat" { bounce(stanza, .serviceUnavailable, to: origin) }
            else if type != "error" { toBareJID(stanza, kind: kind, target: target.bare, origin: origin) }
        case .iq:
            bounce(stanza, .serviceUnavailable, to: origin)
        case .presence:
            break
        }
    }

    /// - Parameter localOnly: only this node's sessions take it (a stanza another node forwarded).
    private func toBareJID(_ stanza: XMLElement, kind: StanzaKind, target: JID, origin: Origin, localOnly: Bool = false) {
        let resources = registry.resources(of: target).filter { !localOnly || $0.session != nil }
        switch kind {
        case .iq:
            // An IQ to a bare JID is answered by the server on the account's behalf (RFC 6121 §8.5.1).
            handleServerIQ(stanza, target: target, origin: origin)
        case .presence:
            _ = deliver(stanza, to: resources.filter(\.available))
        case .message:
            let type = stanza[attribute: "type"] ?? "normal"
            let candidates = resources.filter { $0.available && $0.priority >= 0 }
            if type == "groupchat" && !candidates.isEmpty {
                bounce(stanza, .serviceUnavailable, to: origin)
                return
            }
            // RFC 6121 §8.5.2.1.1: headlines go to every non-negative resource, chat and normal to the
            // highest-priority ones.
            let top = candidates.map(\.priority).max()
            if deliver(stanza, to: candidates.filter { type == "headline" || $0.priority == top }) > 0 { return }
            if type == "chat" || type == "normal" {
                // Offline storage, if enabled, takes it here.
                switch run(.messageUndeliverable, StanzaEvent(stanza: stanza, origin: origin.jid, recipient: target), on: target.domainpart) {
                case .handled, .modify:
                    ServerMetrics.routing[.offline]?.increment()
                    return
                case .reject(let condition, let text):
                    bounce(stanza, condition, text: text, to: origin)
                    return
                case .refuse(let error):
                    bounce(stanza, error, to: origin)
                    return
                case .pass: break
                }
            }
            // RFC 6121 §8.5.2.2.1 allows service-unavailable when nothing stores it.
            if type == "chat" || type == "normal" || type == "groupchat" { bounce(stanza, .serviceUnavailable, to: origin) }
        }
    }

    /// The last step of every delivery to a local session: the recipient's modules may drop, refuse or
    /// rewrite the stanza (blocking, carbons, client state indication).
    private func deliverLocal(_ stanza: XMLElement, to session: ClientSession) {
        switch screen(stanza, for: session) {
        case .unchanged: session.deliver(stanza)
        case .replaced(let modified): session.deliver(modified)
        case .stopped: break
        }
    }

    enum Screening {
        case unchanged
        case replaced(XMLElement)
        case stopped
    }

    /// What the recipient's modules make of a delivery; a refusal is answered to the sender here.
    private func screen(_ stanza: XMLElement, for session: ClientSession) -> Screening {
        guard let tables = modules[session.jid.domainpart], tables.screensDeliveries else { return .unchanged }
        var delivered = stanza
        delivered[attribute: "to"] = delivered[attribute: "to"] ?? session.jid.description
        switch tables.run(.stanzaToUser, StanzaEvent(stanza: delivered, origin: nil, recipient: session.jid)) {
        case .pass:
            return .unchanged
        case .modify(let modified):
            return .replaced(modified)
        case .handled:
            return .stopped
        case .reject(let condition, let text):
            return refuseDelivery(stanza, StanzaError(condition, text: text), to: session)
        case .refuse(let error):
            return refuseDelivery(stanza, error, to: session)
        }
    }

    /// Tells the sender of a stanza a delivery hook refused why (errors, results and presence go unanswered).
    private func refuseDelivery(_ stanza: XMLElement, _ error: StanzaError, to session: ClientSession) -> Screening {
        let type = stanza[attribute: "type"]
        guard type != "error", type != "result", stanza.name != "presence", let from = stanza[attribute: "from"].flatMap({ JID($0) }) else { return .stopped }
        var reply = stanza.errorReply(error)
        reply[attribute: "from"] = session.jid.bare.description
        reply[attribute: "to"] = from.description
        if case .local(let origin)? = registry.location(of: from) { origin.deliver(reply) } else { routeFromServer(reply) }
        return .stopped
    }

    /// One stanza to many full JIDs (a room's occupants): each recipient's modules screen it as for any
    /// delivery, and what passes unchanged is serialized once for all of them, with one hop per event loop.
    /// Occupants on other nodes get it through one frame per node. `forwarded`: another node sent it, for
    /// sessions here only.
    func deliver(_ stanza: XMLElement, to recipients: [JID], forwarded: Bool = false) {
        var shared: SharedSerialization?
        var batch: [(session: ClientSession, stanza: OutgoingStanza)] = []
        batch.reserveCapacity(recipients.count)
        var remote: [String: [JID]] = [:]
        for recipient in recipients {
            guard recipient.resourcepart != nil, hosts.contains(recipient.domainpart) else {
                if forwarded { continue }
                var copy = stanza
                copy[attribute: "to"] = recipient.description
                routeFromServer(copy)
                continue
            }
            let session: ClientSession
            switch registry.location(of: recipient) {
            case .local(let local)?:
                session = local
            case .remote(let node)?:
                if !forwarded { remote[node, default: []].append(recipient) }
                continue
            case nil:
                continue
            }
            switch screen(stanza, for: session) {
            case .unchanged:
                if shared == nil { shared = SharedSerialization(stanza) }
                batch.append((session, .addressed(shared!)))
            case .replaced(var modified):
                modified[attribute: "to"] = modified[attribute: "to"] ?? recipient.description
                batch.append((session, .element(modified)))
            case .stopped:
                continue
            }
        }
        ClientSession.deliver(batch)
        for (node, recipients) in remote { cluster?.send(.deliver(stanza, recipients: recipients, addressed: true), to: node) }
    }

    /// A reply addressed to the sending session, from the entity it addressed (its own account when the
    /// request had no `to`).
    private func addressedReply(_ reply: XMLElement, to sender: ClientSession, from: JID? = nil) -> XMLElement {
        var reply = reply
        reply[attribute: "to"] = sender.jid.description
        if reply[attribute: "from"] == nil { reply[attribute: "from"] = (from ?? sender.jid.bare).description }
        return reply
    }

    /// Sends an error reply for `stanza` back to its sender; errors are never answered with errors.
    private func bounce(_ stanza: XMLElement, _ condition: StanzaErrorCondition, text: String? = nil, to origin: Origin) {
        bounce(stanza, StanzaError(condition, text: text), to: origin)
    }

    private func bounce(_ stanza: XMLElement, _ error: StanzaError, to origin: Origin) {
        guard stanza[attribute: "type"] != "error", stanza[attribute: "type"] != "result" else { return }
        ServerMetrics.routing[.bounced]?.increment()
        switch origin {
        case .session(let sender):
            sender.deliver(addressedReply(stanza.errorReply(error), to: sender))
        case .address(let sender):
            var reply = stanza.errorReply(error)
            reply[attribute: "to"] = sender.description
            reply[attribute: "from"] = stanza[attribute: "to"]
            routeFromServer(reply)
        }
    }
}
