import StarlingAPI
import StarlingStorage

/// RFC 6121 §3–4: subscriptions with the full state table (including pre-approval), initial presence
/// probes, broadcast to subscribers, directed presence, and unavailable presence when a session ends.
public final class PresenceModule: ServerModule {
    public static let descriptor = ModuleDescriptor(
        name: "presence", summary: "Presence subscriptions and broadcast.", xeps: ["RFC 6121 §3-4"],
        dependencies: ["roster"]
    )

    private let engine: SubscriptionEngine

    public init(host: any ModuleHost) throws {
        guard let store = host.service((any RosterStore).self) else { throw ModuleStartError("no roster storage available") }
        engine = SubscriptionEngine.shared(host: host, store: store)
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature("urn:xmpp:features:pre-approval", for: .server)
        let engine = self.engine
        registrar.hook(.stanzaFromClient, priority: 100) { event in
            guard event.stanza.name == "presence", let origin = event.origin else { return .pass }
            let stanza = event.stanza
            let type = stanza[attribute: "type"]
            let to = stanza[attribute: "to"].flatMap { JID($0) }
            switch type {
            case "subscribe", "subscribed", "unsubscribe", "unsubscribed":
                guard let to else { return .reject(.badRequest, text: "subscription requests need a 'to'") }
                engine.outbound(type!, from: origin, to: to, stanza: stanza)
                return .handled
            case "probe":
                // Probes are the server's business (RFC 6121 §4.3).
                return .handled
            case "error":
                return .pass
            case nil, "unavailable":
                if let to, to.bare != origin.bare {
                    // Another domain (a MUC service, say) is the router's to reach; the target is remembered
                    // either way, so that going offline reaches it too (RFC 6121 §4.6.3).
                    return engine.directed(stanza, from: origin, to: to) ? .handled : .pass
                } else if to == nil {
                    engine.broadcast(stanza, from: origin)
                } else {
                    return .pass
                }
                return .handled
            default:
                return .reject(.badRequest, text: "unknown presence type")
            }
        }
        // From contacts at other domains: their side of subscriptions, probes, and presence to an account.
        registrar.hook(.stanzaFromRemote, priority: 100) { event in
            guard event.stanza.name == "presence", let from = event.origin, let to = event.recipient, to.localpart != nil else { return .pass }
            let stanza = event.stanza
            switch stanza[attribute: "type"] {
            case let type? where ["subscribe", "subscribed", "unsubscribe", "unsubscribed"].contains(type):
                engine.inbound(type, from: from.bare, to: to.bare, stanza: stanza)
                return .handled
            case "probe":
                engine.answerProbe(from: from, to: to.bare)
                return .handled
            case nil, "unavailable":
                guard to.resourcepart == nil else { return .pass }
                engine.deliverToAvailable(stanza, of: to)
                return .handled
            default:
                return .pass
            }
        }
        registrar.hook(.sessionClosed) { event in
            engine.sessionClosed(event.jid)
            return .pass
        }
        // Resumed on another node: contacts are not told it went (it did not); its presence is that node's
        // now, and so are the targets of its directed presence, which must hear when it goes.
        registrar.hook(.sessionHandingOver) { event in
            if let carried = engine.directedPresence(of: event.jid) { event.carry(carried) }
            return .pass
        }
        registrar.hook(.sessionArrived) { event in
            engine.takeUpDirectedPresence(of: event.jid, from: event.carried)
            return .pass
        }
        registrar.hook(.sessionMoved) { event in
            engine.sessionMoved(event.jid)
            return .pass
        }
        registrar.hook(.clusterSessionsChanged) { event in
            engine.clusterSessionsChanged(event)
            return .pass
        }
    }
}
