import Logging
import StarlingAPI

/// Local stanza routing (RFC 6120 §10, RFC 6121 §8) between bound sessions. Runs on the sending
/// session's event loop; deliveries hop to the recipient's loop.
public final class Router: Sendable {
    let registry: SessionRegistry
    let hosts: Set<String>
    let logger: Logger

    public init(registry: SessionRegistry, hosts: Set<String>, logger: Logger) {
        self.registry = registry
        self.hosts = hosts
        self.logger = logger
    }

    /// Routes a stanza whose `from` the c2s layer has stamped with `sender`'s full JID.
    public func route(_ stanza: XMLElement, from sender: ClientSession) {
        let kind = StanzaKind(rawValue: stanza.name)!
        let to = stanza[attribute: "to"].flatMap { JID($0) }
        if kind == .presence && to == nil {
            updateOwnPresence(stanza, sender: sender)
            return
        }
        // No `to` means the sender's own account (RFC 6120 §10.3).
        let target = to ?? sender.jid.bare
        guard hosts.contains(target.domainpart) else {
            // No server-to-server yet: every other domain is unreachable.
            bounce(stanza, .remoteServerNotFound, to: sender)
            return
        }
        if target.localpart == nil {
            toServer(stanza, kind: kind, sender: sender)
        } else if target.resourcepart != nil {
            toFullJID(stanza, kind: kind, target: target, sender: sender)
        } else {
            toBareJID(stanza, kind: kind, target: target, sender: sender)
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

    private func toServer(_ stanza: XMLElement, kind: StanzaKind, sender: ClientSession) {
        guard kind == .iq else { return }
        handleServerIQ(stanza, sender: sender)
    }

    /// IQs the server answers itself (for its domain, or on behalf of an account's bare JID).
    private func handleServerIQ(_ iq: XMLElement, sender: ClientSession) {
        let type = iq[attribute: "type"]
        guard type == "get" || type == "set" else { return }
        if type == "get", iq.child("ping", namespace: Namespace.ping) != nil {
            sender.deliver(addressedReply(iq.iqResult(), to: sender))
            return
        }
        bounce(iq, .serviceUnavailable, to: sender)
    }

    private func toFullJID(_ stanza: XMLElement, kind: StanzaKind, target: JID, sender: ClientSession) {
        switch registry.location(of: target) {
        case .local(let session)?:
            session.deliver(stanza)
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
            handleServerIQ(stanza, sender: sender)
        case .presence:
            for resource in registry.resources(of: target) where resource.available {
                resource.session.deliver(stanza)
            }
        case .message:
            let type = stanza[attribute: "type"] ?? "normal"
            let candidates = registry.resources(of: target).filter { $0.available && $0.priority >= 0 }
            guard let top = candidates.map(\.priority).max() else {
                // No offline storage yet: RFC 6121 §8.5.2.2.1 allows service-unavailable.
                if type == "chat" || type == "normal" || type == "groupchat" { bounce(stanza, .serviceUnavailable, to: sender) }
                return
            }
            if type == "groupchat" {
                bounce(stanza, .serviceUnavailable, to: sender)
                return
            }
            for resource in candidates where resource.priority == top {
                resource.session.deliver(stanza)
            }
        }
    }

    private func addressedReply(_ reply: XMLElement, to sender: ClientSession) -> XMLElement {
        var reply = reply
        reply[attribute: "to"] = sender.jid.description
        if reply[attribute: "from"] == nil { reply[attribute: "from"] = sender.jid.bare.description }
        return reply
    }

    /// Sends an error reply for `stanza` back to its sender; errors are never answered with errors.
    private func bounce(_ stanza: XMLElement, _ condition: StanzaErrorCondition, to sender: ClientSession) {
        guard stanza[attribute: "type"] != "error", stanza[attribute: "type"] != "result" else { return }
        sender.deliver(addressedReply(stanza.errorReply(condition), to: sender))
    }
}
