import StarlingAPI

/// XEP-0030: what this server (and each account) is and supports, built from what the enabled
/// modules declare; nothing is listed that no module implements.
public final class DiscoModule: ServerModule {
    public static let infoNamespace = "http://jabber.org/protocol/disco#info"
    public static let itemsNamespace = "http://jabber.org/protocol/disco#items"
    public static let descriptor = ModuleDescriptor(
        name: "disco", summary: "Service discovery for the server and accounts.", xeps: ["XEP-0030", "XEP-0115"],
        options: [
            ModuleOptionSpec("server_name", .string(choices: nil), default: .string("Starling"), doc: "The server identity's name."),
        ]
    )

    private let host: any ModuleHost
    private let serverName: String

    public init(host: any ModuleHost) {
        self.host = host
        serverName = host.options.string("server_name")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.infoNamespace, for: .both)
        registrar.feature(Self.itemsNamespace, for: .both)
        let host = self.host
        let serverName = self.serverName
        registrar.iq(.get, "query", Self.infoNamespace, target: .both) { request in
            // Only the root node exists for now; entity-caps nodes are answered by clients themselves.
            if request.payload[attribute: "node"] != nil { return .error(.itemNotFound) }
            var query = XMLElement(name: "query", namespace: Self.infoNamespace)
            if request.to.localpart == nil {
                query.append(XMLElement(name: "identity", namespace: Self.infoNamespace, attributes: ["category": "server", "type": "im", "name": serverName]))
                for feature in host.serverFeatures {
                    query.append(XMLElement(name: "feature", namespace: Self.infoNamespace, attributes: ["var": feature]))
                }
            } else {
                // An account's own disco: only its owner learns what the server does on its behalf.
                guard request.from.bare == request.to.bare else { return .error(.serviceUnavailable) }
                query.append(XMLElement(name: "identity", namespace: Self.infoNamespace, attributes: ["category": "account", "type": "registered"]))
                for feature in host.accountFeatures {
                    query.append(XMLElement(name: "feature", namespace: Self.infoNamespace, attributes: ["var": feature]))
                }
            }
            return .result(query)
        }
        registrar.iq(.get, "query", Self.itemsNamespace, target: .both) { request in
            if request.payload[attribute: "node"] != nil { return .error(.itemNotFound) }
            var query = XMLElement(name: "query", namespace: Self.itemsNamespace)
            // The server's services at their own domains (a MUC service, say).
            if request.to.localpart == nil {
                for component in host.components {
                    query.append(XMLElement(name: "item", namespace: Self.itemsNamespace, attributes: ["jid": component.domain, "name": component.name]))
                }
            }
            return .result(query)
        }
    }
}
