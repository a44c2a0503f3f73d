import StarlingAPI

/// XEP-0030: what this server (and each account) is and supports, built from what the enabled
/// modules declare; nothing is listed that no module implements.
public final class DiscoModule: ServerModule {
    public static let infoNamespace = "http://jabber.org/protocol/disco#info"
    public static let itemsNamespace = "http://jabber.org/protocol/disco#items"
    public static let descriptor = ModuleDescriptor(
        name: "disco", summary: "Service discovery for the server and accounts.", xeps: ["XEP-0030", "XEP-0115", "XEP-0128", "XEP-0157"],
        options: [
            ModuleOptionSpec("server_name", .string(choices: nil), default: .string("Starling"), doc: "The server identity's name."),
        ] + contactRoles.map { role in
            ModuleOptionSpec("\(role)_addresses", .stringList, default: .stringList([]),
                             doc: "XEP-0157 contact addresses for \(role) (URIs such as mailto:, xmpp: or https:), listed in the server's disco#info.")
        }
    )
    /// XEP-0157's registered roles.
    static let contactRoles = ["abuse", "admin", "feedback", "sales", "security", "status", "support"]

    private let host: any ModuleHost
    private let serverName: String
    /// The XEP-0157 form, when any address is configured.
    private let contactForm: XMLElement?

    public init(host: any ModuleHost) {
        self.host = host
        serverName = host.options.string("server_name")
        let fields = Self.contactRoles.compactMap { role -> DataForm.Field? in
            let addresses = host.options.stringList("\(role)_addresses")
            return addresses.isEmpty ? nil : DataForm.Field("\(role)-addresses", values: addresses)
        }
        contactForm = fields.isEmpty ? nil : DataForm(type: .result, formType: "http://jabber.org/network/serverinfo", fields: fields).element
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.infoNamespace, for: .both)
        registrar.feature(Self.itemsNamespace, for: .both)
        let host = self.host
        let serverName = self.serverName
        let contactForm = self.contactForm
        registrar.iq(.get, "query", Self.infoNamespace, target: .both, fromRemote: true) { request in
            // Only the root node exists for now; entity-caps nodes are answered by clients themselves.
            if request.payload[attribute: "node"] != nil { return .error(.itemNotFound) }
            var query = XMLElement(name: "query", namespace: Self.infoNamespace)
            let identities: [DiscoIdentity]
            let features: [String]
            if request.to.localpart == nil {
                identities = [DiscoIdentity(category: "server", type: "im", name: serverName)] + host.identities(for: .server)
                features = host.serverFeatures
            } else if request.from.bare == request.to.bare {
                identities = [DiscoIdentity(category: "account", type: "registered")] + host.identities(for: .account)
                features = host.accountFeatures
            } else {
                // Others learn what modules publish on every account's behalf (a PEP service), answered
                // alike whether or not the account exists, so the answer reveals no account.
                identities = host.identities(for: .account)
                guard !identities.isEmpty else { return .error(.serviceUnavailable) }
                features = host.accountFeatures
            }
            for identity in identities {
                var attributes = ["category": identity.category, "type": identity.type]
                attributes["name"] = identity.name
                query.append(XMLElement(name: "identity", namespace: Self.infoNamespace, attributes: attributes))
            }
            for feature in features {
                query.append(XMLElement(name: "feature", namespace: Self.infoNamespace, attributes: ["var": feature]))
            }
            if request.to.localpart == nil, let contactForm { query.append(contactForm) }
            return .result(query)
        }
        registrar.iq(.get, "query", Self.itemsNamespace, target: .both, fromRemote: true) { request in
            let node = request.payload[attribute: "node"]
            var query = XMLElement(name: "query", namespace: Self.itemsNamespace)
            query[attribute: "node"] = node
            // The server's services at their own domains (a MUC service, say).
            if request.to.localpart == nil, node == nil {
                for component in host.components {
                    query.append(XMLElement(name: "item", namespace: Self.itemsNamespace, attributes: ["jid": component.domain, "name": component.name]))
                }
            }
            // What modules list there (an account's PEP nodes, say).
            guard let items = await host.discoItems(request) else { return .error(.itemNotFound) }
            for item in items { query.append(item) }
            return .result(query)
        }
    }
}
