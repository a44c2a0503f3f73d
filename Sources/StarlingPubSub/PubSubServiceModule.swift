import StarlingAPI
import StarlingStorage

/// A XEP-0060 publish-subscribe service at its own domain (default `pubsub.<host>`): leaf nodes that
/// users create, configure and publish to, with explicit subscriptions under the open, presence,
/// roster, authorize and whitelist access models.
public final class PubSubServiceModule: ServerModule {
    static let clusterNamespace = "urn:starling:pubsub"
    public static let descriptor = ModuleDescriptor(
        name: "pubsub", summary: "A publish-subscribe service at pubsub.<host>.", xeps: ["XEP-0060", "XEP-0248"],
        options: [
            ModuleOptionSpec("domain", .string(choices: nil), default: .string("pubsub.@HOST@"), doc: "The service's domain; @HOST@ stands for the host."),
            ModuleOptionSpec("name", .string(choices: nil), default: .string("Publish-Subscribe"), doc: "The service's name in service discovery."),
            ModuleOptionSpec("node_creation", .string(choices: ["anyone", "local", "admins"]), default: .string("local"),
                             doc: "Who may create nodes: anyone, local (users of this server), admins."),
            ModuleOptionSpec("admins", .stringList, default: .stringList([]), doc: "JIDs that own every node of the service."),
            ModuleOptionSpec("max_nodes", .integer(1...10_000_000), default: .integer(10_000), doc: "Nodes the service holds at most."),
            ModuleOptionSpec("max_items", .integer(1...100_000), default: .integer(1_000), doc: "Items a node keeps at most (what pubsub#max_items 'max' means)."),
            ModuleOptionSpec("max_item_size", .integer(256...16_777_216), default: .integer(262_144), doc: "Largest item payload in bytes."),
        ]
    )

    static let features = [
        "", "#access-authorize", "#access-open", "#access-presence", "#access-roster", "#access-whitelist", "#auto-create", "#config-node",
        "#create-and-configure", "#create-nodes", "#delete-items", "#delete-nodes", "#get-pending", "#instant-nodes", "#item-ids",
        "#last-published", "#manage-affiliations", "#manage-subscriptions", "#modify-affiliations", "#persistent-items", "#publish",
        "#publish-options", "#purge-nodes", "#retract-items", "#retrieve-affiliations", "#retrieve-default", "#retrieve-items",
        "#retrieve-subscriptions", "#subscribe", "#subscription-notifications",
    ].map { PubSubNamespace.pubsub + $0 }

    private let host: any ModuleHost
    private let domain: String
    private let name: String
    private let engine: PubSubEngine

    public init(host: any ModuleHost) throws {
        self.host = host
        guard let store = host.service((any PubSubStore).self), let rosters = host.service((any RosterStore).self) else {
            throw ModuleStartError("no PubSub or roster storage available")
        }
        domain = host.options.string("domain").replacingOccurrences(of: "@HOST@", with: host.domain)
        guard let service = JID(domain), service.localpart == nil, service.resourcepart == nil else {
            throw ModuleStartError("pubsub domain '\(domain)' is not a domain name")
        }
        name = host.options.string("name")
        let admins = Set(host.options.stringList("admins").compactMap { JID($0)?.bare })
        let creation = host.options.string("node_creation")
        let rules = PubSubRules(subscriptions: true, maxNodes: host.options.integer("max_nodes"), maxItems: host.options.integer("max_items"),
                                maxItemSize: host.options.integer("max_item_size"), mayCreate: { requester, _ in
                                    switch creation {
                                    case "anyone": return true
                                    case "admins": return admins.contains(requester)
                                    default: return host.isLocal(requester.domainpart) && requester.localpart != nil
                                    }
                                }, admins: admins)
        engine = PubSubEngine(host: host, store: store, rosters: rosters, rules: rules, cachedServices: 100,
                              clusterNamespace: Self.clusterNamespace) { _, _, cached in
            cached.subscriptions.filter { $0.value == "subscribed" }.keys.sorted().compactMap { JID($0) }
        }
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.component(domain, name: name) { [self] input in
            Task { await receive(input) }
        }
        registrar.hook(.clusterMessage) { [engine] event in engine.clusterMessage(event.message) ? .handled : .pass }
        // This node serves the domain now: what another node changed is read again.
        registrar.hook(.componentClaimed) { [engine, domain] event in
            if event.domain == domain, let service = JID(domain) { engine.forget(service) }
            return .pass
        }
    }

    private func receive(_ input: ComponentStanza) async {
        let stanza = input.stanza
        let service = input.to.domain
        switch stanza.name {
        case "iq":
            guard let type = stanza[attribute: "type"].flatMap(IQType.init(rawValue:)), let payload = stanza.elements.first else { return }
            guard input.to.localpart == nil else { return answer(input, .error(.serviceUnavailable)) }
            let request = IQRequest(stanza: stanza, from: input.from, to: service)
            do {
                switch (type, payload.name, payload.namespace) {
                case (.get, "query", PubSubNamespace.discoInfo):
                    answer(input, try await info(node: payload[attribute: "node"], for: input.from.bare))
                case (.get, "query", PubSubNamespace.discoItems):
                    guard let items = try await engine.discoItems(node: payload[attribute: "node"], for: input.from.bare, service: service) else {
                        return answer(input, .error(.itemNotFound))
                    }
                    var query = XMLElement(name: "query", namespace: PubSubNamespace.discoItems)
                    query[attribute: "node"] = payload[attribute: "node"]
                    for item in items { query.append(item) }
                    answer(input, .result(query))
                case (_, "pubsub", PubSubNamespace.pubsub), (_, "pubsub", PubSubNamespace.owner):
                    answer(input, try await engine.handle(request, type: type, service: service))
                default:
                    answer(input, .error(.serviceUnavailable))
                }
            } catch {
                host.log(.error, "pubsub request failed: \(error)")
                answer(input, .error(.internalServerError))
            }
        case "message":
            // An owner's answer to a subscription request; other messages are not for us.
            _ = try? await engine.approval(stanza, from: input.from, service: service)
        default:
            break
        }
    }

    private func info(node: String?, for requester: JID) async throws -> IQResponse {
        var query = XMLElement(name: "query", namespace: PubSubNamespace.discoInfo)
        guard let node else {
            query.append(XMLElement(name: "identity", namespace: PubSubNamespace.discoInfo, attributes: ["category": "pubsub", "type": "service", "name": name]))
            for feature in ["http://jabber.org/protocol/disco#info", "http://jabber.org/protocol/disco#items"] + Self.features {
                query.append(XMLElement(name: "feature", namespace: PubSubNamespace.discoInfo, attributes: ["var": feature]))
            }
            return .result(query)
        }
        guard let service = JID(domain), let cached = try await engine.nodes(of: service)[node],
              try await engine.refusal(of: requester, service: service, node: cached) == nil else { return .error(.itemNotFound) }
        query[attribute: "node"] = node
        query.append(XMLElement(name: "identity", namespace: PubSubNamespace.discoInfo, attributes: ["category": "pubsub", "type": "leaf"]))
        query.append(XMLElement(name: "feature", namespace: PubSubNamespace.discoInfo, attributes: ["var": PubSubNamespace.pubsub]))
        // XEP-0060 §5.4: the node's metadata.
        var fields = [DataForm.Field("pubsub#access_model", values: [cached.config.accessModel]),
                      DataForm.Field("pubsub#max_items", values: [String(cached.config.maxItems)])]
        if let title = cached.config.title { fields.append(DataForm.Field("pubsub#title", values: [title])) }
        if let type = cached.config.type { fields.append(DataForm.Field("pubsub#type", values: [type])) }
        fields.append(DataForm.Field("pubsub#owner", type: "jid-multi", values: cached.config.affiliations.filter { $0.value == "owner" }.keys.sorted()))
        query.append(DataForm(type: .result, formType: "http://jabber.org/protocol/pubsub#meta-data", fields: fields).element)
        return .result(query)
    }

    private func answer(_ input: ComponentStanza, _ response: IQResponse) {
        host.route(input.reply(response))
    }
}
