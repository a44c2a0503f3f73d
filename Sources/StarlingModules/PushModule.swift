import StarlingAPI
import StarlingStorage
import Synchronization

/// XEP-0357: a phone's app registers its app server's push node; while the phone cannot take a message
/// (its session detached by stream management, in CSI inactive state, or gone), the server publishes a
/// summary to that node, and the app server wakes the phone.
///
/// A registration is claimed by the session that enabled it (a flag every node of a cluster sees). A message
/// for the account notifies every registration no bound session claims, when it is routed; a registration
/// whose session is detached or inactive is notified when the message reaches that session.
public final class PushModule: ServerModule {
    public static let namespace = "urn:xmpp:push:0"
    static let summaryFormType = "urn:xmpp:push:summary"
    static let publishOptionsFormType = "http://jabber.org/protocol/pubsub#publish-options"
    static let pubsub = "http://jabber.org/protocol/pubsub"
    /// Where the module tells its peers on other nodes that an account's registrations changed.
    static let clusterNamespace = "urn:starling:push:0"
    static let maxNodeLength = 1024

    public static let descriptor = ModuleDescriptor(
        name: "push", summary: "Push notifications to phones' app servers.", xeps: ["XEP-0357"],
        options: [
            ModuleOptionSpec("include_body", .boolean, default: .boolean(false),
                             doc: "Put the message text into notifications (last-message-body). Off: the app server, a third party, and the platform's push service behind it learn only that a message came and how many."),
            ModuleOptionSpec("include_sender", .boolean, default: .boolean(true), doc: "Name the sender's bare JID in notifications (last-message-sender)."),
            ModuleOptionSpec("max_registrations", .integer(1...1000), default: .integer(20), doc: "Push registrations (app server and node) one account may hold."),
        ]
    )

    /// Why a session cannot take messages itself right now.
    private struct Quiet {
        var detached = false
        var inactive = false
        var any: Bool { detached || inactive }
    }

    private let host: any ModuleHost
    private let store: any PushStore
    private let includeBody: Bool
    private let includeSender: Bool
    private let maxRegistrations: Int
    /// Registrations per account, read from the store once and dropped when they change (here or, as
    /// other nodes tell, elsewhere).
    private let registrations = ShardedDictionary<JID, [PushRegistration]>()
    private let cachedAccounts = Atomic<Int>(0)
    /// Counts registration changes: a load that overlapped one is not cached (it may predate the change).
    private let changes = Atomic<Int>(0)
    static let maxCachedAccounts = 100_000
    /// Sessions on this node that are detached or inactive, by full JID.
    private let quiet = ShardedDictionary<JID, Quiet>()
    private let quietCount = Atomic<Int>(0)
    /// Messages notified per account and registration since a session that claims it was last live.
    private let counts = ShardedDictionary<String, Int>()
    /// Notifications waiting for the app server's answer, by IQ id: an error disables the registration.
    private let pending = Mutex<[String: (user: JID, registration: PushRegistration)]>([:])
    /// Registrations disabled here (by the client, or by the app server's error), by `countKey`: none of them
    /// is notified again, even by a notification that read the registrations before the store forgot them.
    private let disabled = Mutex<Set<String>>([])
    private let nextID = Atomic<Int>(0)

    public init(host: any ModuleHost) throws {
        self.host = host
        store = try host.require((any PushStore).self, "push registration storage")
        includeBody = host.options.boolean("include_body")
        includeSender = host.options.boolean("include_sender")
        maxRegistrations = host.options.integer("max_registrations")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .account)
        registrar.iq(.set, "enable", Self.namespace, target: .account) { [self] request in try await enable(request) }
        registrar.iq(.set, "disable", Self.namespace, target: .account) { [self] request in try await disable(request) }
        // A message for the account: registrations no bound session claims hear of it now.
        registrar.hook(.messageToAccount, priority: -300) { [self] event in
            guard let account = event.recipient?.bare, account.localpart != nil else { return .pass }
            // Most accounts have no registration: known from the cache, that costs no task and no look at the
            // stanza (a revocation for such an account has nothing to disable either).
            if registrations[account]?.isEmpty == true { return .pass }
            if let message = Self.notable(event.stanza) {
                Task { await notifyUnclaimed(account, about: message) }
            } else if let from = event.stanza[attribute: "from"].flatMap({ JID($0) }), let node = Self.revokedNode(event.stanza, for: account) {
                Task { await remoteDisable(account, service: from, node: node) }
            }
            return .pass
        }
        // A message reaching a detached or inactive session: the registrations it claims hear of it.
        registrar.hook(.stanzaToUser, priority: -150) { [self] event in
            guard quietCount.load(ordering: .relaxed) > 0, let session = event.recipient, quiet[session]?.any == true,
                  let message = Self.notable(event.stanza) else { return .pass }
            Task { await notifyClaimed(by: session, about: [message]) }
            return .pass
        }
        registrar.hook(.sessionDetached) { [self] event in
            setQuiet(event.jid) { $0.detached = true }
            // What the lost connection never confirmed may not have reached the phone either.
            let missed = event.unacknowledged.compactMap(Self.notable)
            if !missed.isEmpty { Task { await notifyClaimed(by: event.jid, about: missed) } }
            return .pass
        }
        registrar.hook(.sessionResumed) { [self] event in
            // Connected again, and active: a resumed stream starts active (XEP-0352 §5.2).
            setQuiet(event.jid) {
                $0.detached = false
                $0.inactive = false
            }
            resetCounts(claimedBy: event.jid)
            return .pass
        }
        // What is kept per session here goes when it ends, or when it moves to another node of the cluster.
        let forgetSession: @Sendable (SessionEvent) -> HookResult = { [self] event in
            if quiet.removeValue(forKey: event.jid) != nil { quietCount.add(-1, ordering: .relaxed) }
            return .pass
        }
        registrar.hook(.sessionClosed, forgetSession)
        registrar.hook(.sessionMoved, forgetSession)
        // Client state (XEP-0352), watched before the csi module takes the nonza.
        registrar.hook(.nonzaFromClient, priority: 100) { [self] event in
            guard event.stanza.namespace == "urn:xmpp:csi:0", let session = event.origin else { return .pass }
            switch event.stanza.name {
            case "inactive": setQuiet(session) { $0.inactive = true }
            case "active":
                setQuiet(session) { $0.inactive = false }
                resetCounts(claimedBy: session)
            default: break
            }
            return .pass
        }
        // The app servers' answers to our publishes, before anything else routes them.
        let takeAnswer: @Sendable (StanzaEvent) -> HookResult = { [self] event in
            let stanza = event.stanza
            guard stanza.name == "iq", let id = stanza[attribute: "id"], id.hasPrefix("push-"),
                  stanza[attribute: "type"] == "result" || stanza[attribute: "type"] == "error",
                  let waiting = pending.withLock({ $0.removeValue(forKey: id) }) else { return .pass }
            if stanza[attribute: "type"] == "error" {
                // XEP-0357 §"Publish Errors": the service no longer takes this node's notifications.
                host.log(.info, "push: \(waiting.registration.service) refused a notification for \(waiting.user): registration disabled")
                markDisabled(waiting.user, waiting.registration)
                Task { await disableRegistration(waiting.registration, of: waiting.user) }
            }
            return .handled
        }
        registrar.hook(.stanzaFromClient, priority: 1100, takeAnswer)
        registrar.hook(.stanzaFromRemote, priority: 1100, takeAnswer)
        registrar.hook(.clusterMessage) { [self] event in
            guard event.message.namespace == Self.clusterNamespace, let account = event.message[attribute: "account"].flatMap({ JID($0) }) else { return .pass }
            changes.add(1, ordering: .releasing)
            forget(account)
            return .handled
        }
    }

    // MARK: Enabling and disabling

    private func enable(_ request: IQRequest) async throws -> IQResponse {
        let account = request.from.bare
        guard request.to == account else { return .error(.forbidden, text: "push is enabled for one's own account") }
        let payload = request.payload
        guard let service = payload[attribute: "jid"].flatMap({ JID($0) }) else { return .error(.badRequest, text: "'jid' names the push service") }
        let node = payload[attribute: "node"] ?? ""
        guard node.utf8.count <= Self.maxNodeLength else { return .error(.badRequest, text: "node longer than \(Self.maxNodeLength) bytes") }
        let options = payload.elements.first { DataForm($0)?.formType == Self.publishOptionsFormType }
        let registration = PushRegistration(service: service, node: node, publishOptions: options?.serialized())
        guard try await store.enablePush(registration, for: account, limit: maxRegistrations) else {
            return .error(.resourceConstraint, text: "at most \(maxRegistrations) push registrations per account")
        }
        changed(account)
        _ = disabled.withLock { $0.remove(Self.countKey(account, registration)) }
        host.setFlag(Self.flag(registration), true, for: request.from)
        _ = counts.removeValue(forKey: Self.countKey(account, registration))
        return .result()
    }

    private func disable(_ request: IQRequest) async throws -> IQResponse {
        let account = request.from.bare
        guard request.to == account else { return .error(.forbidden, text: "push is disabled for one's own account") }
        guard let service = request.payload[attribute: "jid"].flatMap({ JID($0) }) else { return .error(.badRequest, text: "'jid' names the push service") }
        let node = request.payload[attribute: "node"]
        let affected = try await registrationsOf(account).filter { $0.service == service && (node == nil || $0.node == node) }
        for registration in affected { markDisabled(account, registration) }
        try await store.disablePush(service: service, node: node, for: account)
        changed(account)
        for registration in affected {
            host.setFlag(Self.flag(registration), false, for: request.from)
            _ = counts.removeValue(forKey: Self.countKey(account, registration))
        }
        return .result()
    }

    private func disableRegistration(_ registration: PushRegistration, of account: JID) async {
        do {
            try await store.disablePush(service: registration.service, node: registration.node, for: account)
            changed(account)
        } catch {
            host.log(.warning, "push: cannot disable \(registration.service) for \(account): \(error)")
        }
    }

    /// XEP-0357 §"Remote Disabling": the service took away the account's right to publish to a node.
    private func remoteDisable(_ account: JID, service: JID, node: String) async {
        guard let registrations = try? await registrationsOf(account),
              let registration = registrations.first(where: { $0.service == service.bare && $0.node == node }) else { return }
        markDisabled(account, registration)
        await disableRegistration(registration, of: account)
    }

    /// The account's registrations changed: forget them here and on every other node.
    private func changed(_ account: JID) {
        changes.add(1, ordering: .releasing)
        forget(account)
        host.broadcastToCluster(XMLElement(name: "changed", namespace: Self.clusterNamespace, attributes: ["account": account.description]))
    }

    // MARK: Notifying

    private func notifyUnclaimed(_ account: JID, about message: XMLElement) async {
        guard let all = try? await registrationsOf(account), !all.isEmpty else { return }
        let claimed = host.resources(of: account).reduce(into: Set<String>()) { $0.formUnion($1.flags) }
        for registration in all where !claimed.contains(Self.flag(registration)) {
            publish(registration, for: account, about: [message])
        }
    }

    private func notifyClaimed(by session: JID, about messages: [XMLElement]) async {
        let account = session.bare
        guard let flags = host.resources(of: account).first(where: { $0.jid == session })?.flags, flags.contains(where: { $0.hasPrefix("push:") }),
              let all = try? await registrationsOf(account) else { return }
        for registration in all where flags.contains(Self.flag(registration)) {
            publish(registration, for: account, about: messages)
        }
    }

    /// One notification with the XEP-0357 summary (and the client's publish options).
    private func publish(_ registration: PushRegistration, for account: JID, about messages: [XMLElement]) {
        guard let last = messages.last, !disabled.withLock({ $0.contains(Self.countKey(account, registration)) }) else { return }
        let count = counts.withValue(for: Self.countKey(account, registration)) { count -> Int in
            count = (count ?? 0) + messages.count
            return count!
        }
        var fields = [DataForm.Field("message-count", values: [String(count)])]
        if includeSender, let sender = last[attribute: "from"].flatMap({ JID($0) }) {
            fields.append(DataForm.Field("last-message-sender", values: [sender.bare.description]))
        }
        if includeBody, let body = last.child("body")?.text {
            fields.append(DataForm.Field("last-message-body", values: [String(body.prefix(512))]))
        }
        var notification = XMLElement(name: "notification", namespace: Self.namespace)
        notification.append(DataForm(type: .submit, formType: Self.summaryFormType, fields: fields).element)
        var item = XMLElement(name: "item", namespace: Self.pubsub)
        item.append(notification)
        var publish = XMLElement(name: "publish", namespace: Self.pubsub, attributes: ["node": registration.node])
        publish.append(item)
        var pubsub = XMLElement(name: "pubsub", namespace: Self.pubsub)
        pubsub.append(publish)
        if let options = registration.publishOptions.flatMap(StoredXML.parse) {
            var publishOptions = XMLElement(name: "publish-options", namespace: Self.pubsub)
            publishOptions.append(options)
            pubsub.append(publishOptions)
        }
        let id = "push-\(nextID.add(1, ordering: .relaxed).newValue)"
        var iq = XMLElement(name: "iq", namespace: Namespace.client, attributes: [
            "type": "set", "id": id, "from": account.description, "to": registration.service.description,
        ])
        iq.append(pubsub)
        pending.withLock { waiting in
            // An app server that never answers must not grow this: the oldest waits are forgotten.
            if waiting.count >= 10_000 { waiting.removeAll() }
            waiting[id] = (account, registration)
        }
        host.log(.debug, "push: notifying \(registration.service) node \(registration.node) for \(account) (\(count) messages)")
        host.route(iq)
    }

    // MARK: Helpers

    private func registrationsOf(_ account: JID) async throws -> [PushRegistration] {
        if let known = registrations[account] { return known }
        let before = changes.load(ordering: .acquiring)
        let loaded = try await store.pushRegistrations(of: account)
        guard changes.load(ordering: .acquiring) == before else { return loaded }
        // A bounded cache: past its size it starts over (an account is one read away).
        if cachedAccounts.load(ordering: .relaxed) >= Self.maxCachedAccounts {
            for key in registrations.snapshot().keys { forget(key) }
        }
        registrations.withValue(for: account) { cached in
            if cached == nil { cachedAccounts.add(1, ordering: .relaxed) }
            cached = loaded
        }
        return loaded
    }

    private func markDisabled(_ account: JID, _ registration: PushRegistration) {
        disabled.withLock { keys in
            // Bounded: past this, a registration a notification read just before its removal might hear once more.
            if keys.count >= 100_000 { keys.removeAll() }
            keys.insert(Self.countKey(account, registration))
        }
    }

    private func forget(_ account: JID) {
        if registrations.removeValue(forKey: account) != nil { cachedAccounts.add(-1, ordering: .relaxed) }
    }

    private func setQuiet(_ session: JID, _ change: (inout Quiet) -> Void) {
        quiet.withValue(for: session) { state in
            var updated = state ?? Quiet()
            change(&updated)
            switch (state != nil, updated.any) {
            case (false, true):
                state = updated
                quietCount.add(1, ordering: .relaxed)
            case (true, false):
                state = nil
                quietCount.add(-1, ordering: .relaxed)
            case (true, true):
                state = updated
            case (false, false):
                break
            }
        }
    }

    private func resetCounts(claimedBy session: JID) {
        guard let flags = host.resources(of: session.bare).first(where: { $0.jid == session })?.flags else { return }
        for flag in flags where flag.hasPrefix("push:") {
            _ = counts.removeValue(forKey: session.bare.description + "\u{0}" + flag)
        }
    }

    /// The session flag that claims a registration: the same on every node (FNV-1a of service and node).
    static func flag(_ registration: PushRegistration) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in registration.service.description.utf8 + [0] + registration.node.utf8 {
            hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01b3
        }
        return "push:" + String(hash, radix: 16)
    }

    private static func countKey(_ account: JID, _ registration: PushRegistration) -> String {
        account.description + "\u{0}" + flag(registration)
    }

    /// The message a notification is about: one a person would want to be woken for (a body, an encrypted
    /// body, an invitation), or the message inside a received carbon; nil for chat states, receipts,
    /// errors, group chat and headlines.
    static func notable(_ stanza: XMLElement) -> XMLElement? {
        guard stanza.name == "message" else { return nil }
        let type = stanza[attribute: "type"] ?? "normal"
        guard type == "chat" || type == "normal" else { return nil }
        if stanza.child("body") != nil
            || stanza.elements.contains(where: { $0.name == "encrypted" && ($0.namespace == "eu.siacs.conversations.axolotl" || $0.namespace == "urn:xmpp:omemo:2") })
            || stanza.child("x", namespace: "jabber:x:conference") != nil
            || stanza.child("x", namespace: "http://jabber.org/protocol/muc#user")?.child("invite", namespace: "http://jabber.org/protocol/muc#user") != nil {
            return stanza
        }
        if let inner = stanza.child("received", namespace: "urn:xmpp:carbons:2")?.child("forwarded", namespace: "urn:xmpp:forward:0")?
            .child("message", namespace: Namespace.client) {
            return notable(inner)
        }
        return nil
    }

    /// The node of a XEP-0357 affiliation-none notice for `account`, if the message is one.
    static func revokedNode(_ stanza: XMLElement, for account: JID) -> String? {
        guard let pubsub = stanza.child("pubsub", namespace: pubsub), let node = pubsub[attribute: "node"],
              let affiliation = pubsub.child("affiliation", namespace: Self.pubsub), affiliation[attribute: "affiliation"] == "none",
              affiliation[attribute: "jid"].flatMap({ JID($0)?.bare }) == account else { return nil }
        return node
    }
}
