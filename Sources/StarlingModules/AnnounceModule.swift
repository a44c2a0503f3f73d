import StarlingAPI
import StarlingStorage

/// Announcements from users the `access` rule allows, as ejabberd's mod_announce takes them: a message to
/// `<host>/announce/online` goes to every online session of the host (a headline unless the message has
/// a type), one to `<host>/announce/all` to every account (kept offline for those away).
public final class AnnounceModule: ServerModule {
    public static let descriptor = ModuleDescriptor(
        name: "announce", summary: "Announcements to a host's online users or all its accounts, by users an access rule allows.",
        xeps: [],
        options: [
            ModuleOptionSpec("access", .accessRule, default: .string("none"), doc: "Who may send announcements (none until a rule says who)."),
        ]
    )

    private let host: any ModuleHost
    private let access: String
    private let accounts: (any AccountStore)?

    public init(host: any ModuleHost) {
        self.host = host
        access = host.options.string("access")
        accounts = host.service((any AccountStore).self)
    }

    public func register(_ registrar: ModuleRegistrar) {
        // Early, so that nothing else treats a message to the server as its own.
        registrar.hook(.stanzaFromClient, priority: 200) { [self] event in
            let stanza = event.stanza
            guard stanza.name == "message", let to = stanza[attribute: "to"].flatMap({ JID($0) }), to.localpart == nil,
                  to.domainpart == host.domain, let target = to.resourcepart, target.hasPrefix("announce/") else { return .pass }
            guard let sender = event.origin, host.allows(access, user: sender.bare, address: nil) else {
                host.log(.info, "announce: \(event.origin?.description ?? "?") may not send announcements")
                return .reject(.forbidden, text: "you may not send announcements")
            }
            switch target {
            case "announce/online":
                let recipients = host.boundResources().map(\.jid)
                host.deliver(announcement(stanza, type: stanza[attribute: "type"] ?? "headline"), to: recipients)
                host.log(.info, "announce: \(sender) to \(recipients.count) online session(s)")
            case "announce/all":
                guard let accounts else { return .reject(.serviceUnavailable, text: "no account storage") }
                let message = announcement(stanza, type: stanza[attribute: "type"] ?? "normal")
                let (host, domain) = (self.host, self.host.domain)
                Task {
                    let users = (try? await accounts.accounts(host: domain)) ?? []
                    for user in users {
                        var copy = message
                        copy[attribute: "to"] = "\(user)@\(domain)"
                        host.route(copy)
                    }
                    host.log(.info, "announce: \(sender) to \(users.count) account(s)")
                }
            default:
                return .reject(.itemNotFound, text: "announce/online or announce/all")
            }
            return .handled
        }
    }

    /// The sender's subject and body, from the host.
    private func announcement(_ stanza: XMLElement, type: String) -> XMLElement {
        var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["from": host.domain, "type": type, "id": StanzaID.next()])
        for child in stanza.elements where child.name == "subject" || child.name == "body" { message.append(child) }
        return message
    }
}
