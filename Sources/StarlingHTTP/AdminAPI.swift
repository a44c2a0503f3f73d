import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import StarlingAPI

/// The server as the admin API sees it (`listeners: - type: admin`). Failures are `AdminCommandError`s,
/// which the API answers with 400, 404, 409 or 503 and `{"error": "..."}`.
public protocol AdminBackend: Sendable {
    func status() async -> AdminStatus
    func hostStats(host: String) async throws(AdminCommandError) -> AdminHostStats
    func users(host: String) async throws(AdminCommandError) -> [String]
    /// Creates the account; returns its JID.
    func register(user: String, host: String, password: String) async throws(AdminCommandError) -> String
    /// Deletes the account and everything it owns, closing its sessions; returns how many were closed.
    func unregister(user: String, host: String) async throws(AdminCommandError) -> Int
    func changePassword(user: String, host: String, password: String) async throws(AdminCommandError)
    /// An account's sessions, roster size and waiting offline messages.
    func userInfo(user: String, host: String) async throws(AdminCommandError) -> AdminUserInfo
    /// Deletes the account's offline messages; returns how many there were.
    func purgeOffline(user: String, host: String) async throws(AdminCommandError) -> Int
    /// Bound sessions, of every node, of one host or all.
    func sessions(host: String?) async throws(AdminCommandError) -> [AdminSessionInfo]
    /// Closes a full JID's session, or every session of a bare JID, with `<policy-violation/>`; returns how many.
    func kick(jid: String, reason: String?) async throws(AdminCommandError) -> Int
    /// Sends one message (`to` set); returns the JID it went to.
    func send(_ message: AdminMessage) async throws(AdminCommandError) -> String
    /// Sends `message` to every online user of `host`, or with `offline` to every account; returns how many.
    func announce(_ message: AdminMessage, host: String, offline: Bool) async throws(AdminCommandError) -> Int
    /// Deletes archived messages from before `before` (XEP-0082), of one account or all; returns how many.
    func purgeArchives(before: String, user: String?) async throws(AdminCommandError) -> Int
    /// Reloads what `what` names; returns what changed, line by line.
    func reload(_ what: AdminReload) async throws(AdminCommandError) -> [String]
    /// The commands `host`'s modules offer.
    func moduleCommands(host: String) async throws(AdminCommandError) -> [AdminCommandInfo]
    func runModuleCommand(_ name: String, host: String, arguments: [String: AdminValue]) async throws(AdminCommandError) -> AdminValue
}

public struct AdminStatus: Codable, Sendable {
    public var version: String
    public var uptimeSeconds: Double
    public var connections: Int
    public var sessions: Int
    public var residentMemoryBytes: Int?
    public var hosts: [String]
    /// This node's name in its cluster.
    public var node: String?

    public init(version: String, uptimeSeconds: Double, connections: Int, sessions: Int, residentMemoryBytes: Int?, hosts: [String], node: String?) {
        self.version = version
        self.uptimeSeconds = uptimeSeconds
        self.connections = connections
        self.sessions = sessions
        self.residentMemoryBytes = residentMemoryBytes
        self.hosts = hosts
        self.node = node
    }
}

public struct AdminHostStats: Codable, Sendable {
    public var host: String
    public var sessions: Int
    public var onlineUsers: Int
    public var registeredUsers: Int
    /// Counters of the host's modules that keep them, by module.
    public var modules: [String: [String: Int]]

    public init(host: String, sessions: Int, onlineUsers: Int, registeredUsers: Int, modules: [String: [String: Int]]) {
        self.host = host
        self.sessions = sessions
        self.onlineUsers = onlineUsers
        self.registeredUsers = registeredUsers
        self.modules = modules
    }
}

public struct AdminUserInfo: Codable, Sendable {
    public var jid: String
    /// Its bound resources' full JIDs, of every node.
    public var sessions: [String]
    public var rosterItems: Int
    public var offlineMessages: Int

    public init(jid: String, sessions: [String], rosterItems: Int, offlineMessages: Int) {
        self.jid = jid
        self.sessions = sessions
        self.rosterItems = rosterItems
        self.offlineMessages = offlineMessages
    }
}

public struct AdminSessionInfo: Codable, Sendable, Equatable {
    public var jid: String
    /// The cluster node holding it; nil for this node (or no cluster).
    public var node: String?
    public var available: Bool
    public var priority: Int

    public init(jid: String, node: String?, available: Bool, priority: Int) {
        self.jid = jid
        self.node = node
        self.available = available
        self.priority = priority
    }
}

/// A message the admin API sends: to one JID (`POST /messages`) or to a host's users (`announce`).
public struct AdminMessage: Codable, Sendable {
    public var to: String?
    /// The sender; the host itself when unset.
    public var from: String?
    public var body: String
    public var subject: String?
    /// chat, normal or headline (the default: announcements are not conversations).
    public var type: String?
}

public enum AdminReload: Sendable {
    case config(dryRun: Bool)
    case hooks
    case module(String)
}

public struct AdminCommandInfo: Codable, Sendable {
    public var name: String
    public var doc: String

    public init(name: String, doc: String) {
        self.name = name
        self.doc = doc
    }
}

/// The admin API's routes (documented in `docs/admin-api.yaml`): JSON in and out (snake_case keys), every
/// route behind `Authorization: Bearer <token>`.
enum AdminAPI {
    static let prefix = "/api/v1"
    static let maxBodyBytes = 1 << 20

    static func addRoutes(to router: Router<StarlingRequestContext>, backend: any AdminBackend, token: String) {
        let api = router.group(RouterPath(prefix)).add(middleware: BearerTokenCheck(token: token))

        api.get("status") { _, _ in try json(await backend.status()) }
        api.get("sessions") { request, _ in
            try await run { () throws(AdminCommandError) in try json(["sessions": await backend.sessions(host: request.uri.queryParameters["host"].map(String.init))]) }
        }
        api.post("sessions/kick") { request, context in
            try await run { () throws(AdminCommandError) in
                let body = try await decode(KickRequest.self, request, context)
                return try json(["kicked": await backend.kick(jid: body.jid, reason: body.reason)])
            }
        }
        api.post("messages") { request, context in
            try await run { () throws(AdminCommandError) in
                let message = try await decode(AdminMessage.self, request, context)
                guard message.to != nil else { throw AdminCommandError(.invalid, "'to' is required") }
                return try json(["sent_to": await backend.send(message)])
            }
        }
        api.post("archives/purge") { request, context in
            try await run { () throws(AdminCommandError) in
                let body = try await decode(PurgeArchivesRequest.self, request, context)
                return try json(["deleted": await backend.purgeArchives(before: body.before, user: body.user)])
            }
        }
        api.post("reload/config") { request, context in
            try await run { () throws(AdminCommandError) in
                let body = try await decode(ReloadConfigRequest.self, request, context, emptyAllowed: true) ?? ReloadConfigRequest()
                return try json(["changes": await backend.reload(.config(dryRun: body.dryRun ?? false))])
            }
        }
        api.post("reload/hooks") { _, _ in
            try await run { () throws(AdminCommandError) in try json(["changes": await backend.reload(.hooks)]) }
        }
        api.post("reload/modules/{module}") { _, context in
            try await run { () throws(AdminCommandError) in try json(["changes": await backend.reload(.module(try parameter("module", context)))]) }
        }

        let hosts = api.group("hosts/{host}")
        hosts.get("stats") { _, context in
            try await run { () throws(AdminCommandError) in try json(await backend.hostStats(host: try parameter("host", context))) }
        }
        hosts.get("users") { _, context in
            try await run { () throws(AdminCommandError) in try json(["users": await backend.users(host: try parameter("host", context))]) }
        }
        hosts.post("users") { request, context in
            try await run { () throws(AdminCommandError) in
                let body = try await decode(RegisterRequest.self, request, context)
                let jid = try await backend.register(user: body.username, host: try parameter("host", context), password: body.password)
                return try json(["jid": jid], status: .created)
            }
        }
        hosts.get("users/{user}") { _, context in
            try await run { () throws(AdminCommandError) in
                try json(await backend.userInfo(user: try parameter("user", context), host: try parameter("host", context)))
            }
        }
        hosts.delete("users/{user}") { _, context in
            try await run { () throws(AdminCommandError) in
                let (user, host) = (try parameter("user", context), try parameter("host", context))
                return try json(["sessions_closed": await backend.unregister(user: user, host: host)])
            }
        }
        hosts.put("users/{user}/password") { request, context in
            try await run { () throws(AdminCommandError) in
                let body = try await decode(PasswordRequest.self, request, context)
                try await backend.changePassword(user: try parameter("user", context), host: try parameter("host", context), password: body.password)
                return Response(status: .noContent)
            }
        }
        hosts.delete("users/{user}/offline") { _, context in
            try await run { () throws(AdminCommandError) in
                try json(["deleted": await backend.purgeOffline(user: try parameter("user", context), host: try parameter("host", context))])
            }
        }
        hosts.post("announce") { request, context in
            try await run { () throws(AdminCommandError) in
                let message = try await decode(AdminMessage.self, request, context)
                let offline = request.uri.queryParameters["offline"].map { $0 == "true" } ?? false
                return try json(["recipients": await backend.announce(message, host: try parameter("host", context), offline: offline)])
            }
        }
        // MUC rooms are the muc module's commands, with paths of their own.
        hosts.get("rooms") { _, context in
            try await run { () throws(AdminCommandError) in
                try json(["rooms": await backend.runModuleCommand("list-rooms", host: try parameter("host", context), arguments: [:])])
            }
        }
        hosts.post("rooms") { request, context in
            try await run { () throws(AdminCommandError) in
                let arguments = try await decode([String: AdminValue].self, request, context)
                return try json(await backend.runModuleCommand("create-room", host: try parameter("host", context), arguments: arguments), status: .created)
            }
        }
        hosts.delete("rooms/{room}") { request, context in
            try await run { () throws(AdminCommandError) in
                var arguments: [String: AdminValue] = ["name": .string(try parameter("room", context))]
                if let reason = request.uri.queryParameters["reason"] { arguments["reason"] = .string(String(reason)) }
                return try json(await backend.runModuleCommand("destroy-room", host: try parameter("host", context), arguments: arguments))
            }
        }
        hosts.get("commands") { _, context in
            try await run { () throws(AdminCommandError) in try json(["commands": await backend.moduleCommands(host: try parameter("host", context))]) }
        }
        hosts.post("commands/{command}") { request, context in
            try await run { () throws(AdminCommandError) in
                let arguments = try await decode([String: AdminValue].self, request, context, emptyAllowed: true) ?? [:]
                let result = try await backend.runModuleCommand(try parameter("command", context), host: try parameter("host", context), arguments: arguments)
                return try json(["result": result])
            }
        }
    }

    struct KickRequest: Decodable { var jid: String; var reason: String? }
    struct PurgeArchivesRequest: Decodable { var before: String; var user: String? }
    struct ReloadConfigRequest: Decodable { var dryRun: Bool? }
    struct RegisterRequest: Decodable { var username: String; var password: String }
    struct PasswordRequest: Decodable { var password: String }

    /// Runs a route's work, turning its failure into the matching status and `{"error": ...}`.
    static func run(_ work: () async throws(AdminCommandError) -> Response) async throws -> Response {
        do { return try await work() } catch { return failure(error) }
    }

    static func failure(_ error: AdminCommandError) -> Response {
        let status: HTTPResponse.Status = switch error.kind {
        case .invalid: .badRequest
        case .notFound: .notFound
        case .conflict: .conflict
        case .unavailable: .serviceUnavailable
        }
        return (try? json(["error": error.message], status: status)) ?? Response(status: status)
    }

    static func parameter(_ name: String, _ context: StarlingRequestContext) throws(AdminCommandError) -> String {
        guard let value = context.parameters.get(name), !value.isEmpty else { throw AdminCommandError(.invalid, "missing \(name) in the path") }
        return value.removingPercentEncoding ?? value
    }

    static func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws(AdminCommandError) -> Response {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let data: Data
        do { data = try encoder.encode(value) } catch { throw AdminCommandError(.invalid, "cannot encode the answer: \(error)") }
        var buffer = ByteBuffer(bytes: data)
        buffer.writeString("\n")
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: buffer))
    }

    /// The request's JSON body as `T` (snake_case keys); nil for an empty body when `emptyAllowed`.
    static func decode<T: Decodable>(_ type: T.Type, _ request: Request, _ context: StarlingRequestContext,
                                     emptyAllowed: Bool) async throws(AdminCommandError) -> T? {
        let body: ByteBuffer
        do { body = try await request.body.collect(upTo: maxBodyBytes) } catch {
            throw AdminCommandError(.invalid, "the body is larger than \(maxBodyBytes) bytes")
        }
        if body.readableBytes == 0 {
            if emptyAllowed { return nil }
            throw AdminCommandError(.invalid, "a JSON body is required")
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        do { return try decoder.decode(T.self, from: Data(body.readableBytesView)) } catch let DecodingError.keyNotFound(key, _) {
            throw AdminCommandError(.invalid, "'\(key.stringValue.snakeCased)' is required")
        } catch let DecodingError.typeMismatch(_, context) {
            throw AdminCommandError(.invalid, "'\(context.codingPath.map(\.stringValue.snakeCased).joined(separator: "."))' has the wrong type")
        } catch {
            throw AdminCommandError(.invalid, "the body is not the JSON this takes")
        }
    }

    static func decode<T: Decodable>(_ type: T.Type, _ request: Request, _ context: StarlingRequestContext) async throws(AdminCommandError) -> T {
        // Not nil: an empty body throws when it is not allowed.
        try await decode(type, request, context, emptyAllowed: false)!
    }
}

private extension String {
    /// `dryRun` → `dry_run`, as the API spells keys.
    var snakeCased: String {
        var out = ""
        for character in self {
            if character.isUppercase { out += "_" + character.lowercased() } else { out.append(character) }
        }
        return out
    }
}

/// Refuses requests without the admin token (401 with `WWW-Authenticate: Bearer`), comparing in constant time.
struct BearerTokenCheck: RouterMiddleware {
    typealias Context = StarlingRequestContext
    let token: [UInt8]

    init(token: String) { self.token = Array(token.utf8) }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let header = request.headers[.authorization], header.lowercased().hasPrefix("bearer "),
              Self.equal(Array(header.utf8.dropFirst(7)), token) else {
            var response = AdminAPI.failure(AdminCommandError(.invalid, "this needs Authorization: Bearer <the admin token>"))
            response.status = .unauthorized
            response.headers[.wwwAuthenticate] = "Bearer"
            return response
        }
        return try await next(request, context)
    }

    static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for (x, y) in zip(a, b) { difference |= x ^ y }
        return difference == 0
    }
}
