import StarlingAPI
import StarlingStorage

/// XEP-0049: clients keep small XML documents on the server, readable only by the account itself.
public final class PrivateXMLModule: ServerModule {
    public static let namespace = "jabber:iq:private"
    public static let descriptor = ModuleDescriptor(name: "private", summary: "Private XML storage.", xeps: ["XEP-0049"])

    private let store: any PrivateXMLStore

    public init(host: any ModuleHost) throws {
        store = try host.require((any PrivateXMLStore).self, "private XML storage")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .account)
        registrar.iq(.get, "query", Self.namespace, target: .account) { [store] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            guard let wanted = Self.singleChild(request) else { return .error(.badRequest, text: "ask for exactly one element") }
            var query = XMLElement(name: "query", namespace: Self.namespace)
            if let stored = try await store.privateXML(of: request.to, name: wanted.name, namespace: wanted.namespace),
               let element = StoredXML.parse(stored) {
                query.append(element)
            } else {
                query.append(XMLElement(name: wanted.name, namespace: wanted.namespace))
            }
            return .result(query)
        }
        registrar.iq(.set, "query", Self.namespace, target: .account) { [store] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            guard let element = Self.singleChild(request) else { return .error(.badRequest, text: "store exactly one element") }
            try await store.setPrivateXML(element.serialized(), of: request.to, name: element.name, namespace: element.namespace)
            return .result(nil)
        }
    }

    /// The one child of the query; `jabber:*` namespaces are reserved (XEP-0049 §3).
    private static func singleChild(_ request: IQRequest) -> XMLElement? {
        let children = request.payload.elements
        guard children.count == 1, !children[0].namespace.hasPrefix("jabber:"), !children[0].namespace.isEmpty else { return nil }
        return children[0]
    }
}
