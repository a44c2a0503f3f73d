import StarlingAPI
import StarlingStorage

/// RFC 6121 §2 rosters with XEP-0237 versioning: get, set, remove, and pushes to the account's
/// resources that asked for the roster.
public final class RosterModule: ServerModule {
    public static let namespace = "jabber:iq:roster"
    public static let descriptor = ModuleDescriptor(
        name: "roster", summary: "Contact lists (rosters) with versioning.", xeps: ["RFC 6121 §2", "XEP-0237"],
        options: [
            ModuleOptionSpec("max_items", .integer(1...100_000), default: .integer(1000), doc: "Contacts one roster may hold."),
            ModuleOptionSpec("max_groups_per_item", .integer(1...1000), default: .integer(32), doc: "Groups one contact may be in."),
        ]
    )

    let host: any ModuleHost
    let store: any RosterStore
    let engine: SubscriptionEngine
    private let maxItems: Int
    private let maxGroups: Int

    public init(host: any ModuleHost) throws {
        guard let store = host.service((any RosterStore).self) else { throw ModuleStartError("no roster storage available") }
        self.host = host
        self.store = store
        self.engine = SubscriptionEngine.shared(host: host, store: store)
        maxItems = host.options.integer("max_items")
        maxGroups = host.options.integer("max_groups_per_item")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature("urn:xmpp:features:rosterver", for: .server)
        registrar.iq(.get, "query", Self.namespace, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            return try await get(request)
        }
        registrar.iq(.set, "query", Self.namespace, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            return try await set(request)
        }
    }

    private func get(_ request: IQRequest) async throws -> IQResponse {
        let user = request.to
        engine.markInterested(request.from)
        let (version, items) = try await store.roster(of: user)
        // XEP-0237: an up-to-date client gets an empty result and only pushes from now on.
        if let clientVersion = request.payload[attribute: "ver"], clientVersion == String(version) {
            return .result(nil)
        }
        var query = XMLElement(name: "query", namespace: Self.namespace, attributes: ["ver": String(version)])
        for item in items { query.append(Self.element(for: item)) }
        return .result(query)
    }

    private func set(_ request: IQRequest) async throws -> IQResponse {
        let items = request.payload.elements.filter { $0.name == "item" && $0.namespace == Self.namespace }
        guard items.count == 1, let element = items.first, let jidText = element[attribute: "jid"] else {
            return .error(.badRequest, text: "a roster set carries exactly one item with a jid")
        }
        guard let contact = JID(jidText)?.bare, JID(jidText)?.resourcepart == nil else { return .error(.jidMalformed) }
        let user = request.to
        if element[attribute: "subscription"] == "remove" {
            let engine = self.engine
            return try await engine.serialized(for: user) {
                try await engine.removeContact(contact, of: user) ? .result(nil) : .error(.itemNotFound)
            }
        }
        if let subscription = element[attribute: "subscription"], subscription != "none" {
            return .error(.badRequest, text: "clients may only set subscription='remove'")
        }
        let groups = element.elements.filter { $0.name == "group" }.map(\.text)
        guard groups.count <= maxGroups else { return .error(.notAcceptable, text: "too many groups") }
        guard !groups.contains(""), Set(groups).count == groups.count else {
            return .error(.badRequest, text: "groups must be non-empty and distinct")
        }
        let name = element[attribute: "name"]
        if let name, name.utf8.count > 1023 { return .error(.notAcceptable, text: "name too long") }
        let maxItems = self.maxItems
        let store = self.store
        let engine = self.engine
        return try await engine.serialized(for: user) {
            let existing = try await store.item(of: user, contact: contact)
            if existing == nil, try await store.roster(of: user).items.count >= maxItems {
                return .error(.notAllowed, text: "the roster is full (\(maxItems) items)")
            }
            var item = existing ?? RosterItem(jid: contact)
            item.name = name
            item.groups = groups
            let version = try await store.put(item, for: user)
            engine.push(item, version: version, to: user)
            return .result(nil)
        }
    }

    static func element(for item: RosterItem, removed: Bool = false) -> XMLElement {
        var element = XMLElement(name: "item", namespace: namespace, attributes: [
            "jid": item.jid.description,
            "subscription": removed ? "remove" : item.subscription.rawValue,
        ])
        if let name = item.name, !removed { element[attribute: "name"] = name }
        if item.askSubscribe && !removed { element[attribute: "ask"] = "subscribe" }
        if !removed {
            for group in item.groups { element.append(XMLElement(name: "group", namespace: namespace).with(text: group)) }
        }
        return element
    }
}
