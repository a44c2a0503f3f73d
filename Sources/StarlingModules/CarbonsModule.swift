import StarlingAPI

/// XEP-0280: resources that enable carbons get a copy of every chat message their account sends or
/// receives on its other resources.
public final class CarbonsModule: ServerModule {
    public static let namespace = "urn:xmpp:carbons:2"
    static let forward = "urn:xmpp:forward:0"
    public static let descriptor = ModuleDescriptor(name: "carbons", summary: "Message carbons.", xeps: ["XEP-0280"])

    private let host: any ModuleHost
    /// The session flag of resources that enabled carbons (on whichever node of a cluster they are).
    static let flag = "carbons"

    public init(host: any ModuleHost) {
        self.host = host
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace)
        registrar.iq(.set, "enable", Self.namespace, target: .both) { [self] request in
            host.setFlag(Self.flag, true, for: request.from)
            return .result()
        }
        registrar.iq(.set, "disable", Self.namespace, target: .both) { [self] request in
            host.setFlag(Self.flag, false, for: request.from)
            return .result()
        }
        // Sent carbons: low priority, so blocking and other policies have had their say.
        // Most accounts have no other resource with carbons on: that answer comes before looking into the stanza.
        registrar.hook(.stanzaFromClient, priority: -100) { [self] event in
            guard let origin = event.origin, event.stanza.name == "message" else { return .pass }
            let resources = host.resources(of: origin.bare)
            func takesCopy(_ resource: ResourceInfo) -> Bool { resource.flags.contains(Self.flag) && resource.jid != origin }
            guard resources.contains(where: takesCopy), Self.isCarbonEligible(event.stanza) else { return .pass }
            for resource in resources where takesCopy(resource) {
                copy(event.stanza, as: "sent", to: resource.jid)
            }
            return .pass
        }
        // Received carbons, sent once per message: when it reaches its first (or only) recipient resource.
        registrar.hook(.stanzaToUser, priority: -100) { [self] event in
            // Most accounts have no carbons-enabled resource: that answer comes before any other work.
            guard let recipient = event.recipient, event.stanza.name == "message" else { return .pass }
            let resources = host.resources(of: recipient.bare)
            guard resources.contains(where: { $0.flags.contains(Self.flag) }), Self.isCarbonEligible(event.stanza),
                  let to = event.stanza[attribute: "to"].flatMap({ JID($0) }) else { return .pass }
            let enabled = resources.filter { $0.flags.contains(Self.flag) }.map(\.jid)
            let receivers: Set<JID>
            if to.resourcepart != nil {
                receivers = [recipient]
            } else {
                let available = resources.filter { $0.available && $0.priority >= 0 }
                let top = available.map(\.priority).max()
                receivers = Set(available.filter { $0.priority == top }.map(\.jid))
                guard recipient == receivers.min(by: { $0.description < $1.description }) else { return .pass }
            }
            for resource in enabled where !receivers.contains(resource) {
                copy(event.stanza, as: "received", to: resource)
            }
            return .pass
        }
    }

    private func copy(_ message: XMLElement, as direction: String, to resource: JID) {
        var forwarded = XMLElement(name: "forwarded", namespace: Self.forward)
        forwarded.append(message)
        var wrapper = XMLElement(name: direction, namespace: Self.namespace)
        wrapper.append(forwarded)
        var carbon = XMLElement(name: "message", namespace: Namespace.client, attributes: [
            "from": resource.bare.description, "to": resource.description, "type": message[attribute: "type"] ?? "chat",
        ])
        carbon.append(wrapper)
        host.route(carbon)
    }

    /// Chat messages, and normal ones with a body, unless marked private or no-copy (XEP-0280 §6).
    static func isCarbonEligible(_ stanza: XMLElement) -> Bool {
        guard stanza.name == "message" else { return false }
        let type = stanza[attribute: "type"] ?? "normal"
        guard type == "chat" || (type == "normal" && stanza.child("body") != nil) else { return false }
        if stanza.child("private", namespace: namespace) != nil || stanza.child("no-copy", namespace: "urn:xmpp:hints") != nil { return false }
        if stanza.child("sent", namespace: namespace) != nil || stanza.child("received", namespace: namespace) != nil { return false }
        return true
    }
}
