import Foundation
import StarlingAPI
import StarlingStorage

/// XEP-0012: the server's uptime, and for an account the seconds since its last session ended (0 while
/// online). Only contacts the account shares presence with may ask about it.
public final class LastActivityModule: ServerModule {
    public static let namespace = "jabber:iq:last"
    public static let descriptor = ModuleDescriptor(name: "last", summary: "Last activity and uptime.", xeps: ["XEP-0012"])

    private let host: any ModuleHost
    private let store: any LastActivityStore
    private let roster: (any RosterStore)?
    private let started = Date()
    /// Keeps an explicit status and the session end that follows it in order.
    private let queue = KeyedSerialQueue()

    public init(host: any ModuleHost) throws {
        self.host = host
        store = try host.require((any LastActivityStore).self, "last activity storage")
        roster = host.service((any RosterStore).self)
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .both)
        registrar.iq(.get, "query", Self.namespace, target: .both, fromRemote: true) { [self] request in
            if request.to.localpart == nil {
                return .result(Self.answer(seconds: Int(Date().timeIntervalSince(started)), status: nil))
            }
            let user = request.to
            if request.from.bare != user {
                let item = try await roster?.item(of: user, contact: request.from.bare)
                guard item?.subscription.contactReceivesPresence == true else { return .error(.forbidden) }
            }
            if host.resources(of: user).contains(where: { $0.available }) { return .result(Self.answer(seconds: 0, status: nil)) }
            guard let last = try await store.lastActivity(of: user) else { return .error(.itemNotFound) }
            return .result(Self.answer(seconds: max(0, Int(Date().timeIntervalSince1970) - last.seconds), status: last.status))
        }
        registrar.hook(.stanzaFromClient, priority: 150) { [self] event in
            // Remember the status text of the unavailable presence that ends a session.
            guard event.stanza.name == "presence", event.stanza[attribute: "type"] == "unavailable",
                  event.stanza[attribute: "to"] == nil, let origin = event.origin else { return .pass }
            record(origin.bare, status: event.stanza.child("status")?.text ?? "")
            return .pass
        }
        registrar.hook(.sessionClosed) { [self] event in
            if !host.resources(of: event.jid.bare).contains(where: { $0.available }) { record(event.jid.bare, status: nil) }
            return .pass
        }
    }

    private func record(_ user: JID, status: String?) {
        let (store, host) = (self.store, self.host)
        queue.enqueue(user) {
            let text: String
            if let status { text = status } else { text = (try? await store.lastActivity(of: user))?.status ?? "" }
            do { try await store.setLastActivity(of: user, at: Int(Date().timeIntervalSince1970), status: text) } catch {
                host.log(.error, "cannot record last activity of \(user): \(error)")
            }
        }
    }

    private static func answer(seconds: Int, status: String?) -> XMLElement {
        var query = XMLElement(name: "query", namespace: namespace, attributes: ["seconds": String(seconds)])
        if let status, !status.isEmpty { query.append(text: status) }
        return query
    }
}
