import Foundation
import StarlingAPI
import StarlingStorage
import Synchronization

/// XEP-0016 privacy lists, as ejabberd's `mod_privacy` offers them: named lists of allow/deny rules by
/// JID, roster group or subscription, for messages, IQs and presence both ways; one default list per
/// account and an active list per session. The XEP-0191 blocklist shows here as the list "Blocked
/// contacts", always in effect, editable through either protocol. Lists of accounts with a session are
/// kept in memory (with the roster entries their rules need) so no stanza waits for storage.
public final class PrivacyModule: ServerModule {
    public static let namespace = "jabber:iq:privacy"
    /// The blocklist, seen as a privacy list.
    static let blockedList = "Blocked contacts"
    static let clusterNamespace = "urn:starling:cluster:privacy"
    static let handoverNamespace = "urn:starling:privacy:handover"
    public static let descriptor = ModuleDescriptor(
        name: "privacy", summary: "Privacy lists: block or allow by JID, group or subscription.", xeps: ["XEP-0016"],
        dependencies: ["roster"],
        options: [
            ModuleOptionSpec("max_lists", .integer(1...1_000), default: .integer(20), doc: "Lists one account may hold."),
            ModuleOptionSpec("max_items", .integer(1...10_000), default: .integer(250), doc: "Items one list may hold."),
        ]
    )

    /// One account's lists as this node keeps them.
    struct Account: Sendable {
        var lists: [String: PrivacyList]
        var defaultList: String?
        /// The roster entries rules about groups and subscriptions look at (nil while no rule does).
        var roster: [JID: RosterItem]?
        /// Each local session's active list, by full JID.
        var active: [JID: String] = [:]
    }

    private let host: any ModuleHost
    private let store: any PrivacyStore
    private let rosters: any RosterStore
    private let blocklists: any BlocklistStore
    private let maxLists: Int
    private let maxItems: Int
    private let accounts = ShardedDictionary<JID, Account>()
    /// Accounts here with at least one list: while none has, stanzas pass without a look.
    private let accountsWithLists = Atomic<Int>(0)
    private let queue = KeyedSerialQueue()

    public init(host: any ModuleHost) throws {
        self.host = host
        store = try host.require((any PrivacyStore).self, "privacy list storage")
        rosters = try host.require((any RosterStore).self, "roster storage")
        blocklists = try host.require((any BlocklistStore).self, "blocklist storage")
        maxLists = host.options.integer("max_lists")
        maxItems = host.options.integer("max_items")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .both)
        registrar.iq(.get, "query", Self.namespace, target: .account) { [self] request in try await get(request) }
        registrar.iq(.set, "query", Self.namespace, target: .account) { [self] request in try await set(request) }
        // Inbound: the recipient session's list; outbound presence: the sender's (broadcasts are
        // screened per contact here, as they are delivered).
        registrar.hook(.stanzaToUser, priority: 900) { [self] event in
            guard accountsWithLists.load(ordering: .relaxed) > 0, let recipient = event.recipient,
                  let from = event.stanza[attribute: "from"].flatMap({ JID($0) }), from.bare != recipient.bare else { return .pass }
            let kind = PrivacyStanzaKind.inbound(event.stanza)
            if denies(kind, for: recipient, contact: from) {
                return kind == .message || kind == .iq ? .reject(.serviceUnavailable, text: nil) : .handled
            }
            if kind == .presenceIn, from.localpart != nil, denies(.presenceOut, for: from, contact: recipient) { return .handled }
            return .pass
        }
        // Outbound messages, IQs and directed presence.
        registrar.hook(.stanzaFromClient, priority: 900) { [self] event in
            guard accountsWithLists.load(ordering: .relaxed) > 0, let origin = event.origin,
                  let to = event.stanza[attribute: "to"].flatMap({ JID($0) }), to.bare != origin.bare else { return .pass }
            let stanza = event.stanza
            let kind: PrivacyStanzaKind
            switch stanza.name {
            case "presence":
                guard stanza[attribute: "type"] == nil || stanza[attribute: "type"] == "unavailable" else { return .pass }
                kind = .presenceOut
            case "message", "iq":
                // XEP-0016's message and iq kinds are inbound; a rule for every kind also holds outbound ones.
                kind = .other
            default:
                return .pass
            }
            guard denies(kind, for: origin, contact: to) else { return .pass }
            return kind == .presenceOut ? .handled : .reject(.notAcceptable, text: "your privacy list blocks this contact")
        }
        registrar.hook(.sessionBound) { [self] event in
            let user = event.jid.bare
            queue.enqueue(user) { [self] in _ = try? await load(user) }
            return .pass
        }
        // A session resumed on another node takes its active list along; that node reads the account's
        // lists as it arrives, then makes the list active again.
        registrar.hook(.sessionHandingOver) { [self] event in
            if let name = accounts[event.jid.bare]?.active[event.jid] {
                event.carry(XMLElement(name: "active", namespace: Self.handoverNamespace, attributes: ["name": name]))
            }
            return .pass
        }
        registrar.hook(.sessionArrived) { [self] event in
            let session = event.jid
            let active = event.carried.first { $0.name == "active" && $0.namespace == Self.handoverNamespace }?[attribute: "name"]
            queue.enqueue(session.bare) { [self] in
                guard let account = try? await load(session.bare) else { return }
                if let active, account.lists[active] != nil {
                    accounts.withValue(for: session.bare) { $0?.active[session] = active }
                }
            }
            return .pass
        }
        // What is kept per session here goes when it ends, or when it moves to another node of the cluster.
        let forgetSession: @Sendable (SessionEvent) -> HookResult = { [self] event in
            accounts.withValue(for: event.jid.bare) { _ = $0?.active.removeValue(forKey: event.jid) }
            if !host.resources(of: event.jid.bare).contains(where: \.isLocal) { replace(event.jid.bare, with: nil) }
            return .pass
        }
        registrar.hook(.sessionClosed, forgetSession)
        registrar.hook(.sessionMoved, forgetSession)
        registrar.hook(.rosterChanged) { [self] event in
            guard accounts[event.user]?.roster != nil else { return .pass }
            queue.enqueue(event.user) { [self] in
                let item = try? await rosters.item(of: event.user, contact: event.contact)
                accounts.withValue(for: event.user) { $0?.roster?[event.contact] = item ?? nil }
            }
            return .pass
        }
        registrar.hook(.clusterMessage) { [self] event in
            guard event.message.namespace == Self.clusterNamespace, let user = event.message[attribute: "jid"].flatMap({ JID($0) }) else { return .pass }
            if accounts[user] != nil { queue.enqueue(user) { [self] in _ = try? await reload(user) } }
            return .handled
        }
    }

    // MARK: Decisions

    /// Whether the list in effect for `session` (its active list, else the account's default) denies
    /// this kind of stanza with `contact`.
    private func denies(_ kind: PrivacyStanzaKind, for session: JID, contact: JID) -> Bool {
        // Kept per account in sharded state: no lock shared by all sessions on the stanza path.
        guard let account = accounts[session.bare], !account.lists.isEmpty else { return false }
        let name = account.active[session] ?? account.defaultList
        guard let name, let list = account.lists[name] else { return false }
        return list.denies(kind, contact: contact, rosterItem: account.roster?[contact.bare]) ?? false
    }

    // MARK: Requests

    private func get(_ request: IQRequest) async throws -> IQResponse {
        guard request.from.bare == request.to else { return .error(.forbidden) }
        let user = request.to
        let names = request.payload.elements.filter { $0.name == "list" }.compactMap { $0[attribute: "name"] }
        guard names.count <= 1 else { return .error(.badRequest, text: "ask for one list at a time") }
        let account = try await load(user)
        var query = XMLElement(name: "query", namespace: Self.namespace)
        if let name = names.first {
            if name == Self.blockedList, blockingEnabled {
                query.append(PrivacyList.element(name: name, rules: try await blockedRules(of: user), namespace: Self.namespace))
            } else {
                guard let list = account.lists[name] else { return .error(.itemNotFound) }
                query.append(PrivacyList.element(name: name, rules: list.rules, namespace: Self.namespace))
            }
            return .result(query)
        }
        var activeElement = XMLElement(name: "active", namespace: Self.namespace)
        activeElement[attribute: "name"] = account.active[request.from]
        query.append(activeElement)
        var defaultElement = XMLElement(name: "default", namespace: Self.namespace)
        defaultElement[attribute: "name"] = account.defaultList
        query.append(defaultElement)
        var listed = account.lists.keys.sorted()
        if blockingEnabled, !(try await blocklists.blocklist(of: user)).isEmpty { listed.append(Self.blockedList) }
        for name in listed { query.append(XMLElement(name: "list", namespace: Self.namespace, attributes: ["name": name])) }
        return .result(query)
    }

    private func set(_ request: IQRequest) async throws -> IQResponse {
        guard request.from.bare == request.to else { return .error(.forbidden) }
        let children = request.payload.elements
        guard children.count == 1, let child = children.first else { return .error(.badRequest, text: "set one thing at a time") }
        let user = request.to
        let name = child[attribute: "name"]
        return try await serially(user) { [self] in
            let account = try await load(user)
            switch child.name {
            case "active":
                guard let name else {
                    accounts.withValue(for: user) { _ = $0?.active.removeValue(forKey: request.from) }
                    return .result(nil)
                }
                guard account.lists[name] != nil else { return .error(.itemNotFound) }
                accounts.withValue(for: user) { $0?.active[request.from] = name }
                return .result(nil)
            case "default":
                if name != nil, account.lists[name!] == nil { return .error(.itemNotFound) }
                if name != account.defaultList, othersUseDefault(user, except: request.from) {
                    return .error(.conflict, text: "another session of yours uses the default list")
                }
                try await store.setDefaultPrivacyList(name, of: user)
                changed(user) { $0.defaultList = name }
                return .result(nil)
            case "list":
                guard let name, !name.isEmpty else { return .error(.badRequest, text: "a list needs a name") }
                if name == Self.blockedList, blockingEnabled { return try await setBlocked(child, user: user) }
                let items = child.elements.filter { $0.name == "item" }
                if items.isEmpty {
                    guard account.lists[name] != nil else { return .error(.itemNotFound) }
                    if account.defaultList == name || activeElsewhere(name, user: user, except: request.from) {
                        return .error(.conflict, text: "the list is in use")
                    }
                    try await store.setPrivacyList(name, rules: nil, of: user)
                    accounts.withValue(for: user) { if $0?.active[request.from] == name { $0?.active[request.from] = nil } }
                    changed(user) { $0.lists[name] = nil }
                } else {
                    let rules: [PrivacyRule]
                    switch PrivacyList.parse(child, namespace: Self.namespace, maxRules: maxItems) {
                    case .success(let parsed): rules = parsed
                    case .failure(let problem): return .error(.badRequest, text: problem.text)
                    }
                    guard account.lists[name] != nil || account.lists.count < maxLists else {
                        return .error(.resourceConstraint, text: "an account holds at most \(maxLists) lists")
                    }
                    try await store.setPrivacyList(name, rules: rules, of: user)
                    let roster = PrivacyList(rules).needsRoster && account.roster == nil ? try await rosterEntries(of: user) : account.roster
                    changed(user) {
                        $0.lists[name] = PrivacyList(rules)
                        $0.roster = roster
                    }
                }
                push(name, to: user)
                return .result(nil)
            default:
                return .error(.badRequest)
            }
        }
    }

    // MARK: The blocklist as a list

    private var blockingEnabled: Bool { host.features(for: .account).contains(BlockingModule.namespace) }

    private func blockedRules(of user: JID) async throws -> [PrivacyRule] {
        try await blocklists.blocklist(of: user).enumerated().map { PrivacyRule(type: "jid", value: $0.element.description, action: "deny", order: $0.offset + 1) }
    }

    /// Replaces the blocklist with the list's JIDs; only rules that deny a JID everything belong there.
    private func setBlocked(_ list: XMLElement, user: JID) async throws -> IQResponse {
        let rules: [PrivacyRule]
        switch PrivacyList.parse(list, namespace: Self.namespace, maxRules: maxItems) {
        case .success(let parsed): rules = parsed
        case .failure(let problem): return .error(.badRequest, text: problem.text)
        }
        guard rules.allSatisfy({ $0.type == "jid" && $0.action == "deny" && $0.stanzas.isEmpty }) else {
            return .error(.notAcceptable, text: "\(Self.blockedList) holds JIDs denied everything only (the XEP-0191 blocklist)")
        }
        let wanted = Set(rules.compactMap { $0.value.flatMap { JID($0) } })
        let current = Set(try await blocklists.blocklist(of: user))
        let unblocked = Array(current.subtracting(wanted)), blocked = Array(wanted.subtracting(current))
        if !unblocked.isEmpty { try await blocklists.unblock(unblocked, for: user) }
        if !blocked.isEmpty { try await blocklists.block(blocked, for: user) }
        _ = host.run(BlockingModule.listChanged, BlocklistChangedEvent(user: user, items: wanted))
        push(Self.blockedList, to: user)
        return .result(nil)
    }

    // MARK: State

    private func load(_ user: JID) async throws -> Account {
        if let account = accounts[user] { return account }
        return try await reload(user)
    }

    @discardableResult
    private func reload(_ user: JID) async throws -> Account {
        let stored = try await store.privacyLists(of: user)
        let lists = stored.lists.mapValues(PrivacyList.init)
        let roster = lists.values.contains(where: \.needsRoster) ? try await rosterEntries(of: user) : nil
        // Sessions' active lists are this node's, not stored: they survive a reload.
        let account = Account(lists: lists, defaultList: stored.defaultList, roster: roster, active: accounts[user]?.active ?? [:])
        // Only accounts with a session here are kept.
        if host.resources(of: user).contains(where: \.isLocal) { replace(user, with: account) }
        return account
    }

    private func rosterEntries(of user: JID) async throws -> [JID: RosterItem] {
        Dictionary(try await rosters.roster(of: user).items.map { ($0.jid, $0) }, uniquingKeysWith: { $1 })
    }

    /// Changes a kept account (from storage when not kept yet) and tells the other nodes.
    private func changed(_ user: JID, _ change: (inout Account) -> Void) {
        accounts.withValue(for: user) { account in
            guard var current = account else { return }
            let had = !current.lists.isEmpty
            change(&current)
            if had != !current.lists.isEmpty { accountsWithLists.add(had ? -1 : 1, ordering: .relaxed) }
            account = current
        }
        host.broadcastToCluster(XMLElement(name: "changed", namespace: Self.clusterNamespace, attributes: ["jid": user.description]))
    }

    private func replace(_ user: JID, with account: Account?) {
        accounts.withValue(for: user) { current in
            let had = !(current?.lists.isEmpty ?? true), has = !(account?.lists.isEmpty ?? true)
            if had != has { accountsWithLists.add(has ? 1 : -1, ordering: .relaxed) }
            current = account
        }
    }

    private func othersUseDefault(_ user: JID, except session: JID) -> Bool {
        let actives = accounts[user]?.active ?? [:]
        return host.resources(of: user).contains { $0.jid != session && actives[$0.jid] == nil }
    }

    private func activeElsewhere(_ name: String, user: JID, except session: JID) -> Bool {
        (accounts[user]?.active ?? [:]).contains { $0.key != session && $0.value == name }
    }

    /// XEP-0016 §2.6: every resource hears that a list changed.
    private func push(_ name: String, to user: JID) {
        for resource in host.resources(of: user) {
            var query = XMLElement(name: "query", namespace: Self.namespace)
            query.append(XMLElement(name: "list", namespace: Self.namespace, attributes: ["name": name]))
            var push = XMLElement(name: "iq", namespace: Namespace.client, attributes: [
                "type": "set", "id": "privacy-push-\(UInt32.random(in: 0...UInt32.max))", "to": resource.jid.description,
            ])
            push.append(query)
            host.route(push)
        }
    }

    private func serially(_ user: JID, _ work: @escaping @Sendable () async throws -> IQResponse) async throws -> IQResponse {
        let result: Result<IQResponse, any Error> = await withCheckedContinuation { continuation in
            queue.enqueue(user) {
                do { continuation.resume(returning: .success(try await work())) } catch { continuation.resume(returning: .failure(error)) }
            }
        }
        return try result.get()
    }
}
