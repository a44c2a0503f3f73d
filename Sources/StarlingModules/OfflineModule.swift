import Foundation
import StarlingAPI
import StarlingStorage

/// XEP-0160: chat and normal messages for an account with no available resource are stored (with a
/// XEP-0203 delay stamp) and delivered at the next initial presence, up to a per-account quota.
public final class OfflineModule: StatusReportingModule {
    public static let descriptor = ModuleDescriptor(
        name: "offline", summary: "Stores messages for offline accounts.", xeps: ["XEP-0160", "XEP-0203"],
        dependencies: ["presence"],
        options: [
            ModuleOptionSpec("max_messages", .integer(1...100_000), default: .integer(100), doc: "Messages stored per account; more are refused with <resource-constraint/>."),
        ]
    )

    private let host: any ModuleHost
    private let store: any OfflineStore
    private let accounts: any AccountStore
    private let limit: Int
    private let queue = KeyedSerialQueue()

    public init(host: any ModuleHost) throws {
        self.host = host
        store = try host.require((any OfflineStore).self, "offline message storage")
        accounts = try host.require((any AccountStore).self, "account storage")
        limit = host.options.integer("max_messages")
    }

    /// Stores and deliveries of offline messages waiting their turn (`starling_module_value{name="pending"}`).
    public var statusCounters: [String: Int] { ["pending": queue.pending] }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature("msgoffline")
        registrar.hook(.messageUndeliverable) { [self] event in
            guard let recipient = event.recipient?.bare else { return .pass }
            let message = event.stanza
            // Chat states and other body-less notices are not worth keeping (XEP-0085 §5.6), nor are
            // messages that ask not to be stored (XEP-0334).
            if message.child("body") == nil || message.child("no-store", namespace: "urn:xmpp:hints") != nil { return .handled }
            store(message, for: recipient)
            return .handled
        }
        registrar.hook(.initialPresence) { [self] event in
            deliver(to: event.jid)
            return .pass
        }
    }

    private func store(_ message: XMLElement, for recipient: JID) {
        var stamped = message
        // A stored message that could not be handed over after all comes back with its first stamp, and
        // waits for the next initial presence (no second attempt now, which could go round in circles).
        let returning = message.child("delay", namespace: "urn:xmpp:delay")?[attribute: "from"] == recipient.domainpart
        if !returning {
            stamped.append(XMLElement(name: "delay", namespace: "urn:xmpp:delay", attributes: [
                "from": recipient.domainpart, "stamp": XMPPDateTime.string(Date()),
            ]))
        }
        let text = stamped.serialized(inheritedNamespace: Namespace.client)
        let (host, store, accounts, limit) = (self.host, self.store, self.accounts, self.limit)
        queue.enqueue(recipient) { [self] in
            let accepted: Bool
            do {
                // RFC 6121 §8.5.1: no such account, no storage.
                guard try await accounts.accountExists(username: recipient.localpart ?? "", host: recipient.domainpart) else {
                    Self.bounce(message, .serviceUnavailable, text: nil, host: host)
                    return
                }
                accepted = try await store.storeOffline(text, for: recipient, limit: limit)
            } catch {
                host.log(.error, "cannot store an offline message for \(recipient): \(error)")
                Self.bounce(message, .internalServerError, text: "the message could not be stored", host: host)
                return
            }
            if !accepted {
                Self.bounce(message, .resourceConstraint, text: "the recipient's offline storage is full", host: host)
                return
            }
            // In a cluster a resource may have come online on another node while this one still thought
            // the account offline (its presence was on the way): it gets what was just stored.
            if !returning, let online = host.resources(of: recipient).first(where: { $0.available && $0.priority >= 0 }) {
                try? await self.deliverNow(to: online.jid)
            }
        }
    }

    private func deliver(to resource: JID) {
        queue.enqueue(resource.bare) { [self] in
            do { try await deliverNow(to: resource) } catch {
                host.log(.error, "cannot read offline messages of \(resource.bare): \(error)")
            }
        }
    }

    /// Hands every stored message to `resource` (run on the account's queue).
    private func deliverNow(to resource: JID) async throws {
        for text in try await store.takeOffline(for: resource.bare) {
            guard var message = StoredXML.parse(text) else { continue }
            message[attribute: "to"] = resource.description
            host.route(message)
        }
    }

    private static func bounce(_ message: XMLElement, _ condition: StanzaErrorCondition, text: String?, host: any ModuleHost) {
        guard message[attribute: "type"] != "error" else { return }
        host.route(message.errorReply(condition, text: text))
    }
}
