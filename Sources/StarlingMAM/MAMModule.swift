import Foundation
import StarlingAPI
import StarlingStorage
import Synchronization

/// The `mam` module: every account's message archive (XEP-0313), with XEP-0359 stanza-ids on what it
/// archives, XEP-0441 preferences, and retention an operator sets. Archiving never delays delivery:
/// entries are written in batches off the stanza path (see `ArchiveWriter`).
public final class MAMModule: ServerModule, StatusReportingModule, ActivatableModule {
    public static let descriptor = ModuleDescriptor(
        name: "mam", summary: "Message archives for accounts (history sync across devices).",
        xeps: ["XEP-0313", "XEP-0359", "XEP-0441", "XEP-0334", "XEP-0059"],
        options: [
            ModuleOptionSpec("default_policy", .string(choices: ["always", "never"]), default: .string("always"),
                             doc: "Whether accounts without preferences of their own have their messages archived."),
            ModuleOptionSpec("page_size", .integer(1...1000), default: .integer(50), doc: "Results per page when a query names no maximum."),
            ModuleOptionSpec("max_page_size", .integer(1...1000), default: .integer(250), doc: "Results per page at most, whatever a query asks."),
            ModuleOptionSpec("retention_days", .integer(0...36_500), default: .integer(0),
                             doc: "Messages older than this many days are deleted (hourly); 0 keeps them forever."),
            ModuleOptionSpec("max_messages", .integer(0...100_000_000), default: .integer(0),
                             doc: "Messages kept per account (the oldest go first); 0 for no limit."),
            ModuleOptionSpec("queue_size", .integer(100...1_000_000), default: .integer(10_000),
                             doc: "Messages waiting to be stored at most; beyond, messages are delivered without being archived (storage slow or down)."),
        ]
    )

    private let host: any ModuleHost
    private let store: any ArchiveStore
    private let rosterStore: (any RosterStore)?
    private let writer: ArchiveWriter
    private let runner: ArchiveQueryRunner
    private let policy: ArchivePolicy
    private let retentionDays: Int
    private let maxMessages: Int
    private let sweeper = Mutex<Task<Void, Never>?>(nil)
    /// Messages written per archive since it was last trimmed to `maxMessages`.
    private let sinceTrim = ShardedDictionary<JID, Int>()

    public init(host: any ModuleHost) throws {
        guard let store = host.service((any ArchiveStore).self) else { throw ModuleStartError("mam: no archive storage available") }
        let options = host.options
        self.host = host
        self.store = store
        rosterStore = host.service((any RosterStore).self)
        retentionDays = options.integer("retention_days")
        maxMessages = options.integer("max_messages")
        policy = ArchivePolicy(serverDefault: options.string("default_policy") == "always")
        runner = ArchiveQueryRunner(store: store, pageSize: options.integer("page_size"), maxPageSize: options.integer("max_page_size"))
        let (cap, sinceTrim) = (maxMessages, self.sinceTrim)
        // Trimming every write would double the statements; every tenth of the cap (at most 100) keeps
        // an archive within that much of it.
        let trimEvery = max(1, min(100, cap / 10))
        writer = ArchiveWriter(
            store: store, accounts: host.service((any AccountStore).self), host: host, name: "mam",
            limits: ArchiveWriter.Limits(queued: options.integer("queue_size"))
        ) { archives in
            guard cap > 0 else { return }
            for archive in archives {
                let due = sinceTrim.withValue(for: archive) { count -> Bool in
                    count = (count ?? 0) + 1
                    guard count! >= trimEvery else { return false }
                    count = nil
                    return true
                }
                if due { _ = try? await store.trimArchive(archive, keep: cap) }
            }
        }
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(MAMNamespace.mam, for: .account)
        registrar.feature(MAMNamespace.extended, for: .account)
        registrar.feature(MAMNamespace.mam + "#groupchat-field", for: .account)
        registrar.feature(MAMNamespace.stanzaID, for: .account)
        if store.supportsFullTextSearch { registrar.feature(MAMNamespace.fullText, for: .account) }

        registrar.iq(.get, "query", MAMNamespace.mam, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden, text: "only the account may read its archive") }
            return .result(runner.form())
        }
        registrar.iq(.set, "query", MAMNamespace.mam, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden, text: "only the account may read its archive") }
            let query: ArchiveQuery
            do throws(ArchiveQuery.Refusal) { query = try ArchiveQuery(request.payload, fullText: store.supportsFullTextSearch) } catch {
                return .error(error.condition, text: error.text)
            }
            await writer.caughtUp()
            return try await runner.run(query, on: request.to) { result in
                var result = result
                result[attribute: "from"] = request.to.description
                result[attribute: "to"] = request.from.description
                host.route(result)
            }
        }
        registrar.iq(.get, "metadata", MAMNamespace.mam, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden, text: "only the account may read its archive") }
            await writer.caughtUp()
            return .result(try await runner.metadata(of: request.to))
        }
        registrar.iq(.get, "prefs", MAMNamespace.mam, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            return .result(Self.element(policy.preferences(of: request.to)))
        }
        registrar.iq(.set, "prefs", MAMNamespace.mam, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            let preferences: ArchivePreferences
            do throws(ArchiveQuery.Refusal) { preferences = try Self.preferences(request.payload) } catch { return .error(error.condition, text: error.text) }
            try await store.setArchivePreferences(preferences, of: request.to)
            try await policy.set(preferences, of: request.to, rosterStore: rosterStore)
            // Every node decides what to archive from its own copy of the preferences.
            var changed = XMLElement(name: "preferences", namespace: Self.clusterNamespace, attributes: ["jid": request.to.description])
            changed.append(Self.element(preferences))
            host.broadcastToCluster(changed)
            return .result(Self.element(preferences))
        }
        registrar.hook(.clusterMessage) { [self] event in
            guard event.message.name == "preferences", event.message.namespace == Self.clusterNamespace,
                  let owner = event.message[attribute: "jid"].flatMap({ JID($0) }), let payload = event.message.elements.first,
                  let preferences = try? Self.preferences(payload) else { return .pass }
            let (policy, rosterStore) = (self.policy, self.rosterStore)
            Task { try? await policy.set(preferences, of: owner, rosterStore: rosterStore) }
            return .handled
        }

        // Sent messages: into the sender's archive, after policies (blocking, spam rules) have had their
        // say. The stanza-id rides along until carbons (priority -100) have copied the message for the
        // sender's other resources, and is taken off before it leaves (XEP-0313 §3.4).
        registrar.hook(.stanzaFromClient, priority: -50) { [self] event in
            guard event.stanza.name == "message", let origin = event.origin else { return .pass }
            var message = event.stanza
            var changed = Archivable.stripStanzaIDs(by: origin.bare, from: &message)
            if let to = message[attribute: "to"].flatMap({ JID($0) }), to.bare != origin.bare, Archivable.message(message),
               message.child("x", namespace: MAMNamespace.mucUser) == nil, policy.archives(owner: origin.bare, peer: to) {
                let id = StanzaID.next()
                let entry = ArchiveWriter.Entry(archive: origin.bare, message: Self.archived(message, id: id, with: to), origin: origin)
                if writer.submit([entry]) {
                    message.append(Archivable.stanzaID(id, by: origin.bare))
                    changed = true
                }
            }
            return changed ? .modify(message) : .pass
        }
        registrar.hook(.stanzaFromClient, priority: -1000) { event in
            guard event.stanza.name == "message", let origin = event.origin, event.stanza.child("stanza-id", namespace: MAMNamespace.stanzaID) != nil else { return .pass }
            var message = event.stanza
            return Archivable.stripStanzaIDs(by: origin.bare, from: &message) ? .modify(message) : .pass
        }
        // Received messages: into the recipient's archive, once, before delivery and offline storage,
        // so every copy carries the same stanza-id.
        registrar.hook(.messageToAccount) { [self] event in
            guard let owner = event.recipient?.bare else { return .pass }
            var message = event.stanza
            var changed = Archivable.stripStanzaIDs(by: owner, from: &message)
            if let from = message[attribute: "from"].flatMap({ JID($0) }), Archivable.message(message), policy.archives(owner: owner, peer: from) {
                let id = StanzaID.next()
                message.append(Archivable.stanzaID(id, by: owner))
                let entry = ArchiveWriter.Entry(archive: owner, message: Self.archived(message, id: id, with: from), origin: event.origin,
                                                verifyAccount: host.resources(of: owner).isEmpty)
                if writer.submit([entry]) {
                    changed = true
                } else {
                    _ = Archivable.stripStanzaIDs(by: owner, from: &message)
                }
            }
            return changed ? .modify(message) : .pass
        }
        registrar.hook(.rosterChanged) { [self] event in
            policy.rosterChanged(event)
            return .pass
        }
        registrar.hook(.serverDraining) { [writer] event in
            event.finish { await writer.drain() }
            return .pass
        }
    }

    /// What this module tells its peers on other nodes.
    static let clusterNamespace = "urn:starling:cluster:mam"

    /// Loads preferences, and starts the retention sweep.
    public func activated() {
        let (store, policy, host, rosterStore) = (self.store, self.policy, self.host, self.rosterStore)
        let (retentionDays, domain) = (retentionDays, host.domain)
        let task = Task {
            do {
                for (owner, preferences) in try await store.archivePreferences(host: domain) {
                    try await policy.set(preferences, of: owner, rosterStore: rosterStore)
                }
            } catch {
                host.log(.error, "mam: cannot load archiving preferences (the server's default applies meanwhile): \(error)")
            }
            guard retentionDays > 0 else { return }
            while !Task.isCancelled {
                do {
                    let purged = try await store.purgeArchives(host: domain, user: nil, before: Date().addingTimeInterval(-Double(retentionDays) * 86_400))
                    if purged > 0 { host.log(.info, "mam: \(purged) message(s) older than \(retentionDays) day(s) deleted") }
                } catch {
                    host.log(.error, "mam: retention sweep failed: \(error)")
                }
                try? await Task.sleep(for: .seconds(3600))
            }
        }
        sweeper.withLock { $0 = task }
    }

    public func deactivated() {
        sweeper.withLock { $0?.cancel() }
    }

    public var statusCounters: [String: Int] { writer.statusCounters }

    /// The entry for a message as the archive keeps it.
    static func archived(_ message: XMLElement, id: String, with peer: JID) -> ArchivedMessage {
        ArchivedMessage(id: id, with: peer, stanza: message.serialized(inheritedNamespace: Namespace.client),
                        body: message.child("body")?.text)
    }

    static func element(_ preferences: ArchivePreferences) -> XMLElement {
        var prefs = XMLElement(name: "prefs", namespace: MAMNamespace.mam, attributes: ["default": preferences.defaultBehaviour.rawValue])
        for (name, list) in [("always", preferences.always), ("never", preferences.never)] {
            var element = XMLElement(name: name, namespace: MAMNamespace.mam)
            for jid in list { element.append(XMLElement(name: "jid", namespace: MAMNamespace.mam).with(text: jid.description)) }
            prefs.append(element)
        }
        return prefs
    }

    /// The preferences a `<prefs/>` set asks for; lists are bounded.
    static func preferences(_ prefs: XMLElement) throws(ArchiveQuery.Refusal) -> ArchivePreferences {
        guard let behaviour = prefs[attribute: "default"].flatMap(ArchivePreferences.Default.init(rawValue:)) else {
            throw ArchiveQuery.Refusal(condition: .badRequest, text: "default must be always, never or roster")
        }
        func list(_ name: String) throws(ArchiveQuery.Refusal) -> [JID] {
            let texts = prefs.child(name, namespace: MAMNamespace.mam)?.elements.filter { $0.name == "jid" }.map(\.text) ?? []
            guard texts.count <= 1000 else { throw ArchiveQuery.Refusal(condition: .notAcceptable, text: "at most 1000 JIDs per list") }
            var jids: [JID] = []
            for text in texts {
                guard let jid = JID(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
                    throw ArchiveQuery.Refusal(condition: .jidMalformed, text: "'\(text)' is not a JID")
                }
                jids.append(jid)
            }
            return jids
        }
        return ArchivePreferences(defaultBehaviour: behaviour, always: try list("always"), never: try list("never"))
    }
}
