import ArgumentParser
import Foundation
import Logging
import StarlingAPI
import StarlingConfig
import StarlingModules
import StarlingPortable
import StarlingServer
import StarlingStorage

@main
struct StarlingCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "starlingctl",
        abstract: "Administer a Starling server.",
        subcommands: [Register.self, Unregister.self, ChangePassword.self, ListFASTTokens.self, RevokeFASTTokens.self, Status.self, ConnectedUsers.self, S2SConnections.self, ClusterStatus.self, JoinCluster.self, LeaveCluster.self, ReloadHooks.self, ReloadModule.self, ReloadConfig.self, Migrate.self, Export.self, Import.self, ImportProsody.self, PurgeArchives.self, PurgeUploads.self]
    )
}

struct ConfigOption: ParsableArguments {
    @Option(name: .shortAndLong, help: "Path of the server's configuration file.")
    var config: String = "config/starling.yml"

    func load() throws -> StarlingConfiguration {
        do { return try StarlingConfiguration.load(path: config, moduleCatalog: BuiltinModules.descriptors) } catch {
            throw ValidationError("configuration error: \(error)")
        }
    }
}

/// Account commands work on the store directly, so they also work while the server is down.
struct AccountArguments: ParsableArguments {
    @Argument(help: "The account's localpart.") var user: String
    @Argument(help: "The host (one of the configured hosts).") var host: String

    func jid(in configuration: StarlingConfiguration) throws -> JID {
        let jid: JID
        do { jid = try JID(localpart: user, domainpart: host) } catch { throw ValidationError("invalid account \(user)@\(host): \(error)") }
        guard configuration.hosts.contains(jid.domainpart) else {
            throw ValidationError("\(jid.domainpart) is not a configured host (hosts: \(configuration.hosts.joined(separator: ", ")))")
        }
        return jid
    }
}

/// Opens the configured store, runs `body`, and always closes the store again. A failure is reported
/// as "`failure`: reason".
func withStore(_ configuration: StarlingConfiguration, failure: String, _ body: (any StarlingStore) async throws -> Void) async throws {
    try FileManager.default.createDirectory(atPath: configuration.dataDirectory, withIntermediateDirectories: true)
    var logger = Logger(label: "starlingctl")
    logger.logLevel = .warning
    let store: any StarlingStore
    do { store = try await StorageBackends.open(configuration, logger: logger) } catch {
        throw ValidationError("\(failure): \(error)")
    }
    do {
        try await body(store)
    } catch {
        await store.close()
        throw ValidationError("\(failure): \(error)")
    }
    await store.close()
}

struct Register: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create an account.")
    @OptionGroup var options: ConfigOption
    @OptionGroup var account: AccountArguments
    @Argument(help: "The password (use - to read it from standard input).") var password: String

    func run() async throws {
        let configuration = try options.load()
        let jid = try account.jid(in: configuration)
        let password = try readPassword(self.password)
        try await withStore(configuration, failure: "cannot register \(jid)") { store in
            try await store.register(username: jid.localpart!, host: jid.domainpart, password: password, iterations: configuration.auth.scramIterations)
        }
        print("registered \(jid)")
    }
}

struct Unregister: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Delete an account.")
    @OptionGroup var options: ConfigOption
    @OptionGroup var account: AccountArguments

    func run() async throws {
        let configuration = try options.load()
        let jid = try account.jid(in: configuration)
        try await withStore(configuration, failure: "cannot unregister \(jid)") { store in
            try await store.deleteAccount(username: jid.localpart!, host: jid.domainpart)
        }
        print("unregistered \(jid)")
    }
}

struct ChangePassword: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "change-password", abstract: "Set an account's password.")
    @OptionGroup var options: ConfigOption
    @OptionGroup var account: AccountArguments
    @Argument(help: "The new password (use - to read it from standard input).") var password: String

    func run() async throws {
        let configuration = try options.load()
        let jid = try account.jid(in: configuration)
        let password = try readPassword(self.password)
        try await withStore(configuration, failure: "cannot change the password of \(jid)") { store in
            try await store.changePassword(username: jid.localpart!, host: jid.domainpart, password: password, iterations: configuration.auth.scramIterations)
        }
        print("password changed for \(jid)")
    }
}

struct ListFASTTokens: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fast-tokens",
        abstract: "List an account's FAST tokens (XEP-0484): one line per client installation and slot, with what the client said it is, the mechanism, and when the token was issued and expires.")
    @OptionGroup var options: ConfigOption
    @OptionGroup var account: AccountArguments

    func run() async throws {
        let configuration = try options.load()
        let jid = try account.jid(in: configuration)
        try await withStore(configuration, failure: "cannot list the FAST tokens of \(jid)") { store in
            let tokens = try await store.fastTokens(of: jid)
            if tokens.isEmpty { print("no FAST tokens for \(jid)") }
            for token in tokens {
                let client = [token.software, token.device].compactMap { $0 }.joined(separator: " on ")
                print("\(token.client)\t\(client.isEmpty ? "-" : client)\t\(token.slot.rawValue)\t\(token.mechanism)\t"
                      + "issued \(XMPPDateTime.string(Double(token.issuedAt)))\texpires \(XMPPDateTime.string(Double(token.expiresAt)))")
            }
        }
    }
}

struct RevokeFASTTokens: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "revoke-fast-tokens",
        abstract: "Revoke an account's FAST tokens (XEP-0484), of one client installation or all: those clients need the password to log in again. Sessions already logged in stay until they end.")
    @OptionGroup var options: ConfigOption
    @OptionGroup var account: AccountArguments
    @Option(help: "Only this client installation's tokens (its id, as fast-tokens lists it).") var client: String?

    func run() async throws {
        let configuration = try options.load()
        let jid = try account.jid(in: configuration)
        var revoked = 0
        try await withStore(configuration, failure: "cannot revoke the FAST tokens of \(jid)") { store in
            revoked = try await store.revokeFASTTokens(of: jid, client: client)
        }
        print("revoked \(revoked) FAST token\(revoked == 1 ? "" : "s") of \(jid)\(client.map { " (client \($0))" } ?? "")")
    }
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Bring the configured database's schema up to date (the server also does this at start).")
    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration = try options.load()
        try await withStore(configuration, failure: "cannot migrate") { _ in }
        print("\(configuration.storage.backend.rawValue) schema is up to date")
    }
}

struct Export: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write every account's data as XEP-0227 XML (to move between backends or servers).")
    @OptionGroup var options: ConfigOption
    @Argument(help: "The file to write (- for standard output).") var file: String

    func run() async throws {
        let configuration = try options.load()
        try await withStore(configuration, failure: "cannot export") { store in
            let document = try await PortableData.export(from: store, hosts: configuration.hosts)
            if file == "-" { print(document, terminator: "") } else { try document.write(toFile: file, atomically: true, encoding: .utf8) }
        }
    }
}

struct Import: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create accounts from a XEP-0227 export: Starling's, or ejabberd's export_piefxis (a <server-data/> file and the host files it includes), or one <host/> file. Existing accounts are skipped.")
    @OptionGroup var options: ConfigOption
    @Argument(help: "The <server-data/> file (the host files it includes are read from its folder) or a <host/> file.") var file: String
    @OptionGroup var flags: ImportFlags

    func run() async throws {
        try await flags.run(configuration: try options.load(), source: file) { () throws(ImportError) in try PortableImport.read(path: file) }
    }
}

struct ImportProsody: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import-prosody",
        abstract: "Create accounts from a Prosody data folder (its internal storage, data_path): accounts with their SCRAM keys, rosters, vCards, private XML, offline messages, blocklists and archives, for every host configured here. Existing accounts are skipped.")
    @OptionGroup var options: ConfigOption
    @Argument(help: "Prosody's data_path (e.g. /var/lib/prosody); stop Prosody first so its files are complete.") var dataDirectory: String
    @OptionGroup var flags: ImportFlags

    func run() async throws {
        try await flags.run(configuration: try options.load(), source: dataDirectory) { () throws(ImportError) in
            try ProsodyImport.read(dataDirectory: dataDirectory)
        }
    }
}

struct ImportFlags: ParsableArguments {
    @Flag(help: "Read and check everything and say what would be imported, without writing anything.") var dryRun = false
    @Flag(help: "Replace accounts that exist already (deleting everything they own first) instead of skipping them.") var replace = false

    /// Reads the accounts with `read` (a failure names file and line) and writes them into the configured store.
    func run(configuration: StarlingConfiguration, source: String, read: () throws(ImportError) -> [ImportedAccount]) async throws {
        let accounts: [ImportedAccount]
        do { accounts = try read() } catch { throw ValidationError("cannot import: \(error)") }
        var options = ImportOptions()
        options.dryRun = dryRun
        options.replace = replace
        options.iterations = configuration.auth.scramIterations
        options.progress = { done, total in
            FileHandle.standardError.write(Data("\(dryRun ? "checked" : "imported") \(done) of \(total) accounts\n".utf8))
        }
        try await withStore(configuration, failure: "cannot import \(source)") { store in
            print(try await AccountImport.run(accounts, into: store, hosts: configuration.hosts, options: options))
        }
    }
}

struct PurgeArchives: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "purge-archives",
        abstract: "Delete archived messages (XEP-0313) older than a date: of one account, or of every account on the configured hosts.")
    @OptionGroup var options: ConfigOption
    @Option(help: "XEP-0082 date-time, e.g. 2026-01-01T00:00:00Z: messages archived before it are deleted.") var before: String
    @Option(help: "Only this account's archive (user@host).") var user: String?

    func run() async throws {
        let configuration = try options.load()
        guard let date = XMPPDateTime.date(before) else { throw ValidationError("--before: '\(before)' is not a XEP-0082 date-time (e.g. 2026-01-01T00:00:00Z)") }
        var targets = configuration.hosts.map { (host: $0, user: String?.none) }
        if let user {
            guard let jid = JID(user), let localpart = jid.localpart, jid.resourcepart == nil, configuration.hosts.contains(jid.domainpart) else {
                throw ValidationError("--user: '\(user)' is not an account on a configured host (hosts: \(configuration.hosts.joined(separator: ", ")))")
            }
            targets = [(jid.domainpart, localpart)]
        }
        try await withStore(configuration, failure: "cannot purge archives") { store in
            var total = 0
            for target in targets { total += try await store.purgeArchives(host: target.host, user: target.user, before: date) }
            print("deleted \(total) archived message(s) from before \(XMPPDateTime.string(date))")
        }
    }
}

struct PurgeUploads: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "purge-uploads",
        abstract: "Delete uploaded files (XEP-0363) older than http_upload's expire_after now, on the running server (it also does so hourly).")
    @OptionGroup var options: ConfigOption

    func run() throws {
        let reply = try AdminClient(path: options.load().admin.socketPath).request("purge-uploads")
        guard let object = try JSONSerialization.jsonObject(with: Data(reply.utf8)) as? [String: Any] else { throw ValidationError("unexpected reply: \(reply)") }
        guard let lines = object["reloaded"] as? [String] else { throw ValidationError(object["error"] as? String ?? reply) }
        for line in lines { print(line) }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the running server's status.")
    @OptionGroup var options: ConfigOption

    func run() throws {
        print(try AdminClient(path: options.load().admin.socketPath).request("status"))
    }
}

struct ConnectedUsers: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "connected-users", abstract: "List bound sessions (full JIDs).")
    @OptionGroup var options: ConfigOption

    func run() throws {
        let reply = try AdminClient(path: options.load().admin.socketPath).request("connected-users")
        guard let object = try JSONSerialization.jsonObject(with: Data(reply.utf8)) as? [String: Any],
              let users = object["users"] as? [String]
        else { throw ValidationError("unexpected reply: \(reply)") }
        for user in users { print(user) }
    }
}

struct S2SConnections: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "s2s-connections",
        abstract: "List server-to-server streams: direction, remote domain, authenticated domain pairs, how they authenticated, stanzas each way."
    )
    @OptionGroup var options: ConfigOption
    @Flag(help: "Print the server's JSON reply.") var json = false

    func run() throws {
        let (reply, object) = try adminReply(options, "s2s-connections")
        if json {
            print(reply)
            return
        }
        let connections = object["connections"] as? [[String: Any]] ?? []
        print("\(connections.count) s2s stream(s)")
        for connection in connections {
            let pairs = (connection["pairs"] as? [String] ?? []).joined(separator: ",")
            let state = connection["ready"] as? Bool == true ? "ready" : "negotiating"
            let tls = connection["tls"] as? Bool != true ? "plaintext" : connection["certificateVerified"] as? Bool == true ? "tls(verified)" : "tls"
            let direction = "\(connection["direction"] ?? "?")" + (connection["bidirectional"] as? Bool == true ? "+bidi" : "")
            print("\(direction) \(connection["remote"] ?? "?") [\(pairs)] \(state) \(tls) \(connection["method"] ?? "-") "
                  + "\(connection["address"] ?? "?") in=\(connection["stanzasIn"] ?? 0) out=\(connection["stanzasOut"] ?? 0)")
        }
    }
}

struct ClusterStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster-status",
        abstract: "Show the cluster as this node sees it: every node, its link's state and round trip, and its sessions."
    )
    @OptionGroup var options: ConfigOption
    @Flag(help: "Print the server's JSON reply.") var json = false

    func run() throws {
        let (reply, object) = try adminReply(options, "cluster-status")
        if json {
            print(reply)
            return
        }
        let nodes = object["nodes"] as? [[String: Any]] ?? []
        print("cluster \(object["cluster"] ?? "?"): \(nodes.count) node(s), seen from \(object["node"] ?? "?")")
        print("node".padding(toLength: 16, withPad: " ", startingAt: 0) + "state".padding(toLength: 7, withPad: " ", startingAt: 0)
              + "link".padding(toLength: 24, withPad: " ", startingAt: 0) + "rtt ms".padding(toLength: 9, withPad: " ", startingAt: 0) + "sessions")
        for node in nodes {
            let rtt = (node["roundTripMilliseconds"] as? Double).map { String(format: "%.2f", $0) } ?? "-"
            print("\(node["node"] ?? "?")".padding(toLength: 16, withPad: " ", startingAt: 0) + "\(node["state"] ?? "?")".padding(toLength: 7, withPad: " ", startingAt: 0)
                  + "\(node["link"] ?? "-")".padding(toLength: 24, withPad: " ", startingAt: 0) + rtt.padding(toLength: 9, withPad: " ", startingAt: 0)
                  + "\(node["sessions"] ?? 0)")
        }
    }
}

struct JoinCluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "join-cluster",
        abstract: "Link this node to another node's link address (static discovery), until it restarts."
    )
    @OptionGroup var options: ConfigOption
    @Argument(help: "The other node's link, HOST:PORT.") var peer: String

    func run() throws {
        print(try adminRequest(options, "join-cluster", argument: peer).joined(separator: "\n"))
    }
}

struct LeaveCluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "leave-cluster",
        abstract: "Drain this node and stop it: no new clients, <system-shutdown/> to its sessions (they reconnect through the balancer), goodbye to the other nodes."
    )
    @OptionGroup var options: ConfigOption

    func run() throws {
        print(try adminRequest(options, "leave-cluster").joined(separator: "\n"))
    }
}

struct ReloadHooks: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload-hooks",
        abstract: "Reload the Lua hook scripts (as SIGHUP does). All scripts load or none: on an error the previous ones keep running."
    )
    @OptionGroup var options: ConfigOption

    func run() throws {
        let reloaded = try adminRequest(options, "reload-hooks")
        print(reloaded.isEmpty ? "no host has Lua hooks enabled" : reloaded.joined(separator: "\n"))
    }
}

struct ReloadModule: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload-module",
        abstract: "Load a plugin module's current build from a fresh copy and swap it in; sessions stay connected. The old image stays mapped (never unloaded)."
    )
    @OptionGroup var options: ConfigOption
    @Argument(help: "The module's name, as under plugins: in the config.") var name: String

    func run() throws {
        print(try adminRequest(options, "reload-module", argument: name).joined(separator: "\n"))
    }
}

struct ReloadConfig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload-config",
        abstract: "Read the config file again: module changes apply at once (all or nothing), the rest is listed as needing a restart."
    )
    @OptionGroup var options: ConfigOption
    @Flag(help: "Validate and show what would change, without changing anything.") var dryRun = false

    func run() throws {
        print(try adminRequest(options, "reload-config", argument: dryRun ? "dry-run" : nil).joined(separator: "\n"))
    }
}

/// Sends one of the reload commands and returns what the server reports, or throws its error.
func adminRequest(_ options: ConfigOption, _ command: String, argument: String? = nil) throws -> [String] {
    try adminReply(options, command, argument: argument).object["reloaded"] as? [String] ?? []
}

/// The server's JSON reply to `command`, as text and parsed; a reply that is not ok is an error.
func adminReply(_ options: ConfigOption, _ command: String, argument: String? = nil) throws -> (text: String, object: [String: Any]) {
    let reply = try AdminClient(path: options.load().admin.socketPath).request(command, argument: argument)
    guard let object = try JSONSerialization.jsonObject(with: Data(reply.utf8)) as? [String: Any] else {
        throw ValidationError("unexpected reply: \(reply)")
    }
    guard object["ok"] as? Bool == true else { throw ValidationError("\(command) failed:\n\(object["error"] as? String ?? reply)") }
    return (reply, object)
}

func readPassword(_ argument: String) throws -> String {
    guard argument == "-" else { return argument }
    guard let line = readLine(strippingNewline: true), !line.isEmpty else { throw ValidationError("no password on standard input") }
    return line
}

/// One request, one reply over the server's admin socket.
struct AdminClient {
    let path: String

    func request(_ command: String, argument: String? = nil) throws -> String {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ValidationError("cannot create a socket") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard path.utf8.count < capacity else { throw ValidationError("admin socket path too long: \(path)") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8) + [0])
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            throw ValidationError("the server is not running (cannot connect to \(path): \(String(cString: strerror(errno))))")
        }
        var request = ["command": command]
        request["argument"] = argument
        let line = Array(try JSONSerialization.data(withJSONObject: request)) + [UInt8(ascii: "\n")]
        guard write(fd, line, line.count) == line.count else { throw ValidationError("cannot write to \(path)") }
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while !reply.contains(UInt8(ascii: "\n")) {
            let count = read(fd, &chunk, chunk.count)
            if count <= 0 { break }
            reply += chunk[0..<count]
        }
        return String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
