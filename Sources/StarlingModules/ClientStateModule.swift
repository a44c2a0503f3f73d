import StarlingAPI
import Synchronization

/// XEP-0352: while a client says it is inactive, presence updates and chat-state-only messages wait
/// (only the newest per sender is kept) and go out, in order, as soon as something important arrives
/// or the client is active again.
public final class ClientStateModule: ServerModule {
    public static let namespace = "urn:xmpp:csi:0"
    public static let descriptor = ModuleDescriptor(
        name: "csi", summary: "Client state indication: quiet while the client is in the background.", xeps: ["XEP-0352"],
        options: [ModuleOptionSpec("max_held", .integer(1...100_000), default: .integer(500), doc: "Stanzas held per inactive session before all are released.")]
    )

    private struct Held {
        /// Newest presence per sender, in first-arrival order.
        var presence: [(from: String, stanza: XMLElement)] = []
        var chatStates: [(from: String, stanza: XMLElement)] = []
        var count: Int { presence.count + chatStates.count }
        /// Its held stanzas are being released right now: those pass the hook.
        var releasing = false
    }

    private let host: any ModuleHost
    private let maxHeld: Int
    /// Inactive sessions, by full JID.
    private let inactive = ShardedDictionary<JID, Held>()
    /// How many sessions are inactive: while none is, deliveries pass without a lookup.
    private let inactiveCount = Atomic<Int>(0)

    public init(host: any ModuleHost) {
        self.host = host
        maxHeld = host.options.integer("max_held")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.streamFeature(XMLElement(name: "csi", namespace: Self.namespace), phase: .afterAuthentication)
        registrar.hook(.nonzaFromClient) { [self] event in
            guard event.stanza.namespace == Self.namespace, let session = event.origin else { return .pass }
            switch event.stanza.name {
            case "inactive":
                inactive.withValue(for: session) { held in
                    if held == nil {
                        held = Held()
                        inactiveCount.add(1, ordering: .relaxed)
                    }
                }
            case "active":
                release(session, keepHolding: false)
            default:
                return .pass
            }
            return .handled
        }
        registrar.hook(.stanzaToUser, priority: -200) { [self] event in
            guard inactiveCount.load(ordering: .relaxed) > 0, let session = event.recipient else { return .pass }
            let stanza = event.stanza
            let from = stanza[attribute: "from"] ?? ""
            let decision = inactive.withValue(for: session) { state -> Bool? in
                guard var held = state, !held.releasing else { return nil }
                if stanza.name == "presence" && stanza[attribute: "type"] != "subscribe" && stanza[attribute: "type"] != "error" {
                    held.presence.removeAll { $0.from == from }
                    held.presence.append((from, stanza))
                } else if stanza.name == "message" && Self.isChatStateOnly(stanza) {
                    held.chatStates.removeAll { $0.from == from }
                    held.chatStates.append((from, stanza))
                } else {
                    return false
                }
                state = held
                return held.count <= maxHeld
            }
            switch decision {
            case nil:
                return .pass
            case true?:
                return .handled
            case false?:
                // Something important (or too much held): everything held goes first, then this.
                release(session, keepHolding: true)
                return .pass
            }
        }
        // What is kept per session here goes when it ends, or when it moves to another node of the cluster.
        let forgetSession: @Sendable (SessionEvent) -> HookResult = { [self] event in
            if inactive.removeValue(forKey: event.jid) != nil { inactiveCount.add(-1, ordering: .relaxed) }
            return .pass
        }
        registrar.hook(.sessionClosed, forgetSession)
        registrar.hook(.sessionMoved, forgetSession)
        // A resumed stream starts active (XEP-0352 §5.2): what was held goes to it now.
        registrar.hook(.sessionResumed) { [self] event in
            release(event.jid, keepHolding: false)
            return .pass
        }
    }

    private func release(_ session: JID, keepHolding: Bool) {
        let held = inactive.withValue(for: session) { state -> Held? in
            guard let held = state else { return nil }
            if keepHolding {
                state = Held(releasing: true)
            } else {
                state = nil
                inactiveCount.add(-1, ordering: .relaxed)
            }
            return held
        }
        guard let held else { return }
        for (_, stanza) in held.presence + held.chatStates {
            var copy = stanza
            copy[attribute: "to"] = session.description
            host.route(copy)
        }
        if keepHolding { inactive.withValue(for: session) { state in state?.releasing = false } }
    }

    static func isChatStateOnly(_ message: XMLElement) -> Bool {
        message.child("body") == nil && message.elements.contains { $0.namespace == "http://jabber.org/protocol/chatstates" }
    }
}
