import Logging
import StarlingAPI

/// Every host's module tables, one immutable value.
final class ModuleTables: Sendable {
    let hosts: [String: HostModules]
    /// Component domains (a MUC service's, say) → the handler the module registered.
    let components: [String: ComponentRegistration]

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
    }

    static let empty = try! ModuleTables([:])
}

/// Local stanza routing (RFC 6120 §10, RFC 6121 §8) between bound sessions. Runs on the sending
/// session's event loop; deliveries hop to the recipient's loop.
public final class Router: @unchecked Sendable {
    let registry: SessionRegistry
    let hosts: Set<String>
    let logger: Logger
    /// Per host. Replaced as a whole when a module is reloaded; reads take no lock (see `Swappable`).
    private let tables = Swappable(ModuleTables.empty)
    var modules: [String: HostModules] { tables.current.hosts }
    var components: [String: ComponentRegistration] { tables.current.components }

    public init(registry: SessionRegistry, hosts: Set<String>, logger: Logger) {
        self.registry = registry
        self.hosts = hosts
        self.logger = logger
    }

    func install(modules: [String: HostModules]) throws {
        tables.replace(try ModuleTables(modules))
    }

    /// Swaps in new tables for some hosts; events already running finish on the old ones.
    func replace(_ hosts: [String: HostModules]) throws {
        tables.replace(try ModuleTables(modules.merging(hosts) { $1 }))
    }

    /// Runs a hook on `domain`'s modules.
    func run<Event>(_ point: HookPoint<Event>, _ event: Event, on domain: String) -> HookResult {
        modules[domain]?.run(point, event) ?? .pass
    }

    /// Routes a stanza whose `from` the c2s layer has stamped with `sender`'s full JID.
    public func route(_ stanza: XMLElement, from sender: ClientSession) {
        var stanza = stanza
        guard proceeds(run(.stanzaFromClient, StanzaEvent(stanza: stanza, origin: sender.jid), on: sender.jid.domainpart), &stanza, sender: sender) else {
            return
        }
        let kind = StanzaKind(rawValue: stanza.name)!
        let to = stanza[attribute: "to"].flatMap { JID($0) }
        if kind == .presence && to == nil {
            updateOwnPresence(stanza, sender: sender)
            return
        }
        // No `to` means the sender's own account (RFC 6120 §10.3).
        let target = to ?? sender.jid.bare
        guard hosts.contains(target.domainpart) else {
            if let component = components[target.domainpart] {
                component.handler(ComponentStanza(stanza: stanza, from: sender.jid, to: target))
                return
            }
            // No server-to-server yet: every other domain is unreachable.
            bounce(stanza, .remoteServerNotFound, to: sender)
            return
        }
        if kind == .message && target.localpart != nil,
           !proceeds(run(.messageToAccount, StanzaEvent(stanza: stanza, origin: sender.jid, recipient: target), on: target.domainpart), &stanza, sender: sender) {
            return
        }
        if target.localpart == nil {
            if kind == .iq { handleServerIQ(stanza, target: target, sender: sender) }
        } else if target.resourcepart != nil {
            toFullJID(stanza, kind: kind, target: target, sender: sender)
        } else {
            toBareJID(stanza, kind: kind, target: target, sender: sender)
        }
    }

    /// Carries out a stanza hook's verdict; false when the stanza goes no further (taken, or refused and
    /// bounced to the sender).
    private func proceeds(_ result: HookResult, _ stanza: inout XMLElement, sender: ClientSession) -> Bool {
        switch result {
        case .pass:
            return true
        case .modify(let modified):
            stanza = modified
            return true
        case .handled:
            return false
        case .reject(let condition, let text):
            bounce(stanza, condition, text: text, to: sender)
            return false
        }
    }

    private func updateOwnPresence(_ stanza: XMLElement, sender: ClientSession) {
        switch stanza[attribute: "type"] {
        case nil:
            let priority = stanza.child("priority").flatMap { Int($0.text.trimmingCharacters(in: .whitespaces)) } ?? 0
            registry.setPresence(of: sender, available: true, priority: max(-128, min(127, priority)))
        case "unavailable":
            registry.setPresence(of: sender, available: false, priority: 0)
        default:
            break
        }
    }

    /// IQs the server answers itself, for its domain or on behalf of an account's bare JID, through
    /// the enabled modules' handlers.
    private func handleServerIQ(_ iq: XMLElement, target: JID, sender: ClientSession) {
        let type = iq[attribute: "type"]
        guard let iqType = type.flatMap(IQType.init(rawValue:)), let payload = iq.elements.first else { return }
        let key = ModuleRegistrar.IQKey(type: iqType, name: payload.name, namespace: payload.namespace)
        guard let entry = modules[target.domainpart]?.iqHandlers[key],
              entry.target == .both || entry.target == (target.localpart == nil ? IQTarget.server : IQTarget.account)
        else {
            bounce(iq, .serviceUnavailable, to: sender)
            return
        }
        let request = IQRequest(stanza: iq, from: sender.jid, to: target)
        let logger = self.logger
        Task {
            let reply: XMLElement
            do {
                switch try await entry.handler(request) {
                case .result(let payload):
                    reply = iq.iqResult(payload: payload)
                case .error(let condition, let text):
                    reply = iq.errorReply(condition, text: text)
                }
            } catch {
                logger.error("IQ handler failed", metadata: ["module": "\(entry.module)", "error": "\(error)"])
                reply = iq.errorReply(.internalServerError)
            }
            sender.deliver(self.addressedReply(reply, to: sender, from: target))
        }
    }

    /// Delivers a stanza a module sends (roster pushes, offline messages, room traffic, ...) to local
    /// sessions or to a component.
    func routeFromServer(_ stanza: XMLElement) {
        guard let to = stanza[attribute: "to"].flatMap({ JID($0) }) else {
            logger.debug("dropping a module's stanza without a recipient")
            return
        }
        if let component = components[to.domainpart] {
            let from = stanza[attribute: "from"].flatMap { JID($0) } ?? to.domain
            component.handler(ComponentStanza(stanza: stanza, from: from, to: to))
            return
        }
        guard hosts.contains(to.domainpart), to.localpart != nil else {
            logger.debug("dropping a module's stanza without a local recipient")
            return
        }
        if to.resourcepart != nil {
            if case .local(let session)? = registry.location(of: to) { deliverLocal(stanza, to: session) }
            return
        }
        let available = registry.resources(of: to).filter(\.available)
        if stanza.name == "message" {
            let top = available.filter { $0.priority >= 0 }.map(\.priority).max()
            for resource in available where resource.priority == top { deliverLocal(stanza, to: resource.session) }
        } else {
            for resource in available { deliverLocal(stanza, to: resource.session) }
        }
    }

    private func toFullJID(_ stanza: XMLElement, kind: StanzaKind, target: JID, sender: ClientSession) {
        switch registry.location(of: target) {
        case .local(let session)?:
            deliverLocal(stanza, to: session)
        case .remote?:
            bounce(stanza, .remoteServerTimeout, to: sender)
        case nil:
            // RFC 6121 §8.5.3.2: no such resource.
            switch kind {
            case .message:
                let type = stanza[attribute: "type"] ?? "normal"
                if type == "groupchat" { bounce(stanza, .serviceUnavailable, to: sender) }
                else if type != "error" { toBareJID(stanza, kind: kind, target: target.bare, sender: sender) }
            case .iq:
                bounce(stanza, .serviceUnavailable, to: sender)
            case .presence:
                break
            }
        }
    }

    private func toBareJID(_ stanza: XMLElement, kind: StanzaKind, target: JID, sender: ClientSession) {
        switch kind {
        case .iq:
            // An IQ to a bare JID is answered by the server on the account's behalf (RFC 6121 §8.5.1).
            handleServerIQ(stanza, target: target, sender: sender)
        case .presence:
            for resource in registry.resources(of: target) where resource.available {
                deliverLocal(stanza, to: resource.session)
            }
        case .message:
            let type = stanza[attribute: "type"] ?? "normal"
            let candidates = registry.resources(of: target).filter { $0.available && $0.priority >= 0 }
            guard let top = candidates.map(\.priority).max() else {
                if type == "chat" || type == "normal" {
                    // Offline storage, if enabled, takes it here.
                    switch run(.messageUndeliverable, StanzaEvent(stanza: stanza, origin: sender.jid, recipient: target), on: target.domainpart) {
                    case .handled, .modify: return
                    case .reject(let condition, let text):
                        bounce(stanza, condition, text: text, to: sender)
                        return
                    case .pass: break
                    }
                }
                // RFC 6121 §8.5.2.2.1 allows service-unavailable when nothing stores it.
                if type == "chat" || type == "normal" || type == "groupchat" { bounce(stanza, .serviceUnavailable, to: sender) }
                return
            }
            if type == "groupchat" {
                bounce(stanza, .serviceUnavailable, to: sender)
                return
            }
            // RFC 6121 §8.5.2.1.1: headlines go to every non-negative resource, chat and normal to the
            // highest-priority ones.
            for resource in candidates where type == "headline" || resource.priority == top {
                deliverLocal(stanza, to: resource.session)
            }
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
            let type = stanza[attribute: "type"]
            guard type != "error", type != "result", stanza.name != "presence", let from = stanza[attribute: "from"].flatMap({ JID($0) }) else { return .stopped }
            var reply = stanza.errorReply(condition, text: text)
            reply[attribute: "from"] = session.jid.bare.description
            reply[attribute: "to"] = from.description
            if case .local(let origin)? = registry.location(of: from) { origin.deliver(reply) } else { routeFromServer(reply) }
            return .stopped
        }
    }

    /// One stanza to many full JIDs (a room's occupants): each recipient's modules screen it as for any
    /// delivery, and what passes unchanged is serialized once for all of them, with one hop per event loop.
    func deliver(_ stanza: XMLElement, to recipients: [JID]) {
        var shared: SharedSerialization?
        var batch: [(session: ClientSession, stanza: OutgoingStanza)] = []
        batch.reserveCapacity(recipients.count)
        for recipient in recipients {
            guard recipient.resourcepart != nil, hosts.contains(recipient.domainpart) else {
                var copy = stanza
                copy[attribute: "to"] = recipient.description
                routeFromServer(copy)
                continue
            }
            guard case .local(let session)? = registry.location(of: recipient) else { continue }
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
    private func bounce(_ stanza: XMLElement, _ condition: StanzaErrorCondition, text: String? = nil, to sender: ClientSession) {
        guard stanza[attribute: "type"] != "error", stanza[attribute: "type"] != "result" else { return }
        sender.deliver(addressedReply(stanza.errorReply(condition, text: text), to: sender))
    }
}
