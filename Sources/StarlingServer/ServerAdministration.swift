import Foundation
import StarlingAPI
import StarlingXML
import StarlingConfig
import StarlingHTTP
import StarlingModules
import StarlingSASL
import StarlingStorage

/// What the admin API does to the running server (`starlingctl`'s reloads over the local socket share
/// `reloadBlocking`).
final class ServerAdministration: AdminBackend {
    private let server: ServerContext
    private let store: any StarlingStore
    private let startedAt: Date

    init(server: ServerContext, store: any StarlingStore, startedAt: Date) {
        self.server = server
        self.store = store
        self.startedAt = startedAt
    }

    private var configuration: StarlingConfiguration { server.configuration }

    func status() async -> AdminStatus {
        AdminStatus(version: StarlingVersion.current, uptimeSeconds: Date().timeIntervalSince(startedAt), connections: server.connections.count,
                    sessions: server.registry.sessionCount, residentMemoryBytes: ProcessMemory.residentBytes(), hosts: configuration.hosts,
                    node: configuration.cluster?.node)
    }

    func hostStats(host: String) async throws(AdminCommandError) -> AdminHostStats {
        try requireHost(host)
        let resources = server.registry.allResources.filter { $0.jid.domainpart == host }
        let registered = try await storage { try await self.store.accounts(host: host).count }
        var modules: [String: [String: Int]] = [:]
        for (name, module) in server.router.modules[host]?.modules ?? [:] {
            if let reporting = module as? any StatusReportingModule { modules[name] = reporting.statusCounters }
        }
        return AdminHostStats(host: host, sessions: resources.count, onlineUsers: Set(resources.map(\.jid.bare)).count,
                              registeredUsers: registered, modules: modules)
    }

    func users(host: String) async throws(AdminCommandError) -> [String] {
        try requireHost(host)
        return try await storage { try await self.store.accounts(host: host).sorted() }
    }

    func register(user: String, host: String, password: String) async throws(AdminCommandError) -> String {
        let jid = try account(user, host)
        guard !password.isEmpty else { throw AdminCommandError(.invalid, "the password is empty") }
        if try await storage({ try await self.store.accountExists(username: jid.localpart!, host: host) }) {
            throw AdminCommandError(.conflict, "\(jid) exists already")
        }
        let credentials = await keys(for: password)
        do { try await store.createAccount(username: jid.localpart!, host: host, credentials: credentials) } catch StorageError.accountExists {
            throw AdminCommandError(.conflict, "\(jid) exists already")
        } catch {
            throw AdminCommandError(.unavailable, "storage: \(error)")
        }
        return jid.description
    }

    func unregister(user: String, host: String) async throws(AdminCommandError) -> Int {
        let jid = try await existingAccount(user, host)
        let closed = server.router.closeSessions(of: jid, .notAuthorized)
        try await storage { try await self.store.deleteAccount(username: jid.localpart!, host: host) }
        return closed
    }

    func changePassword(user: String, host: String, password: String) async throws(AdminCommandError) {
        let jid = try await existingAccount(user, host)
        guard !password.isEmpty else { throw AdminCommandError(.invalid, "the password is empty") }
        let credentials = await keys(for: password)
        try await storage { try await self.store.setCredentials(username: jid.localpart!, host: host, credentials: credentials) }
    }

    func userInfo(user: String, host: String) async throws(AdminCommandError) -> AdminUserInfo {
        let jid = try await existingAccount(user, host)
        let roster = try await storage { try await self.store.roster(of: jid).items.count }
        let offline = try await storage { try await self.store.offlineCount(for: jid) }
        return AdminUserInfo(jid: jid.description, sessions: server.registry.resources(of: jid).map(\.jid.description).sorted(),
                             rosterItems: roster, offlineMessages: offline)
    }

    func purgeOffline(user: String, host: String) async throws(AdminCommandError) -> Int {
        let jid = try await existingAccount(user, host)
        return try await storage { try await self.store.takeOffline(for: jid).count }
    }

    func sessions(host: String?) async throws(AdminCommandError) -> [AdminSessionInfo] {
        if let host { try requireHost(host) }
        return server.registry.allResources
            .filter { host == nil || $0.jid.domainpart == host }
            .map { AdminSessionInfo(jid: $0.jid.description, node: $0.node, available: $0.available, priority: $0.priority) }
            .sorted { $0.jid < $1.jid }
    }

    func kick(jid text: String, reason: String?) async throws(AdminCommandError) -> Int {
        guard let jid = JID(text), jid.localpart != nil else { throw AdminCommandError(.invalid, "'\(text)' is not a user's JID") }
        try requireHost(jid.domainpart)
        let kicked = server.router.closeSessions(of: jid, .policyViolation)
        guard kicked > 0 else { throw AdminCommandError(.notFound, "\(jid) has no session") }
        server.logger.notice("sessions kicked by the admin API", metadata: ["jid": "\(jid)", "sessions": "\(kicked)", "reason": "\(reason ?? "")"])
        return kicked
    }

    func send(_ message: AdminMessage) async throws(AdminCommandError) -> String {
        guard let text = message.to, let to = JID(text) else { throw AdminCommandError(.invalid, "'to' is not a JID") }
        try requireHost(to.domainpart)
        let stanza = try makeMessage(message, to: to, host: to.domainpart, defaultType: "chat")
        server.router.routeFromServer(stanza)
        return to.description
    }

    func announce(_ message: AdminMessage, host: String, offline: Bool) async throws(AdminCommandError) -> Int {
        try requireHost(host)
        let recipients: [JID]
        if offline {
            // Every account: the router keeps it for those not online (offline storage takes normal and chat, not headlines).
            recipients = try await storage { try await self.store.accounts(host: host) }.compactMap { try? JID(localpart: $0, domainpart: host) }
        } else {
            recipients = server.registry.allResources.filter { $0.jid.domainpart == host }.map(\.jid)
        }
        for recipient in recipients {
            server.router.routeFromServer(try makeMessage(message, to: recipient, host: host, defaultType: offline ? "normal" : "headline"))
        }
        return recipients.count
    }

    func purgeArchives(before: String, user: String?) async throws(AdminCommandError) -> Int {
        guard let date = XMPPDateTime.date(before) else { throw AdminCommandError(.invalid, "'before' is not a XEP-0082 date-time (2026-01-01T00:00:00Z)") }
        var targets = configuration.hosts.map { (host: $0, user: String?.none) }
        if let user {
            guard let jid = JID(user), let localpart = jid.localpart, jid.resourcepart == nil else { throw AdminCommandError(.invalid, "'user' is not a bare JID") }
            try requireHost(jid.domainpart)
            targets = [(jid.domainpart, localpart)]
        }
        var deleted = 0
        for target in targets {
            deleted += try await storage { try await self.store.purgeArchives(host: target.host, user: target.user, before: date) }
        }
        return deleted
    }

    func reload(_ what: AdminReload) async throws(AdminCommandError) -> [String] {
        let server = self.server
        // Reading files and compiling scripts block: on the thread pool, not a cooperative thread.
        let outcome: Result<[String], AdminCommandError> = await withCheckedContinuation { continuation in
            server.threadPool.submit { _ in
                continuation.resume(returning: Self.reloadBlocking(what, server: server))
            }
        }
        return try outcome.get()
    }

    /// Carries out a reload; blocking, so on the thread pool (the admin socket uses it too).
    static func reloadBlocking(_ what: AdminReload, server: ServerContext) -> Result<[String], AdminCommandError> {
        switch what {
        case .hooks:
            let outcome = server.reloadHooks()
            guard outcome.errors.isEmpty else {
                return .failure(AdminCommandError(.invalid, outcome.errors.joined(separator: "\n") + "\nthe previous hooks keep running"))
            }
            return .success(outcome.summaries + server.scopeNote)
        case .config(let dryRun):
            guard let reloads = server.reloads.withLockedValue({ $0 }) else { return .failure(AdminCommandError(.unavailable, "the server is still starting")) }
            do { return .success(try reloads.reloadConfig(dryRun: dryRun) + server.scopeNote) } catch {
                return .failure(AdminCommandError(.invalid, "\(error)\nnothing was changed"))
            }
        case .module(let name):
            guard let reloads = server.reloads.withLockedValue({ $0 }) else { return .failure(AdminCommandError(.unavailable, "the server is still starting")) }
            do { return .success([try reloads.reloadModule(name)] + server.scopeNote) } catch {
                return .failure(AdminCommandError(.invalid, "\(error)\nnothing was changed"))
            }
        }
    }

    func moduleCommands(host: String) async throws(AdminCommandError) -> [AdminCommandInfo] {
        try requireHost(host)
        return (server.router.modules[host]?.adminCommands ?? [:]).values.map { AdminCommandInfo(name: $0.name, doc: $0.doc) }.sorted { $0.name < $1.name }
    }

    func runModuleCommand(_ name: String, host: String, arguments: [String: AdminValue]) async throws(AdminCommandError) -> AdminValue {
        try requireHost(host)
        guard let command = server.router.modules[host]?.adminCommands[name] else {
            throw AdminCommandError(.notFound, "no module of \(host) offers '\(name)'\(name.hasSuffix("-room") || name == "list-rooms" ? " (is muc enabled there?)" : "")")
        }
        return try await command.handler(arguments)
    }

    // MARK: Helpers

    private func requireHost(_ host: String) throws(AdminCommandError) {
        guard configuration.hosts.contains(host) else {
            throw AdminCommandError(.notFound, "\(host) is not a host of this server (hosts: \(configuration.hosts.joined(separator: ", ")))")
        }
    }

    private func account(_ user: String, _ host: String) throws(AdminCommandError) -> JID {
        try requireHost(host)
        guard let jid = try? JID(localpart: user, domainpart: host) else { throw AdminCommandError(.invalid, "'\(user)' is not a valid username") }
        return jid
    }

    private func existingAccount(_ user: String, _ host: String) async throws(AdminCommandError) -> JID {
        let jid = try account(user, host)
        guard try await storage({ try await self.store.accountExists(username: jid.localpart!, host: host) }) else {
            throw AdminCommandError(.notFound, "no account \(jid)")
        }
        return jid
    }

    private func makeMessage(_ message: AdminMessage, to: JID, host: String, defaultType: String) throws(AdminCommandError) -> XMLElement {
        let type = message.type ?? defaultType
        guard ["chat", "normal", "headline"].contains(type) else { throw AdminCommandError(.invalid, "'type' must be chat, normal or headline") }
        var from = host
        if let sender = message.from {
            guard let jid = JID(sender), configuration.hosts.contains(jid.domainpart) else {
                throw AdminCommandError(.invalid, "'from' must be a JID of this server's hosts")
            }
            from = jid.description
        }
        guard !message.body.isEmpty else { throw AdminCommandError(.invalid, "'body' is empty") }
        var stanza = XMLElement(name: "message", namespace: Namespace.client,
                                attributes: ["from": from, "to": to.description, "type": type, "id": StanzaID.next()])
        if let subject = message.subject { stanza.append(XMLElement(name: "subject", namespace: Namespace.client).with(text: subject)) }
        stanza.append(XMLElement(name: "body", namespace: Namespace.client).with(text: message.body))
        return stanza
    }

    /// SCRAM keys for every hash. PBKDF2 takes milliseconds of CPU: on the thread pool, not a cooperative thread.
    private func keys(for password: String) async -> [SCRAMCredentials] {
        let iterations = configuration.auth.scramIterations
        return await withCheckedContinuation { continuation in
            server.threadPool.submit { _ in
                continuation.resume(returning: SCRAMHash.allCases.map { SCRAMCredentials.generate(password: password, hash: $0, iterations: iterations) })
            }
        }
    }

    /// Runs a storage operation; its failure is the API's 503.
    private func storage<T>(_ operation: @escaping () async throws -> T) async throws(AdminCommandError) -> T {
        do { return try await operation() } catch { throw AdminCommandError(.unavailable, "storage: \(error)") }
    }
}
