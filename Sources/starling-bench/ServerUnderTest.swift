import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging
import StarlingConfig
import StarlingModules
import StarlingSASL
import StarlingServer
import StarlingStorage
import StarlingTestClient

/// Which server a scenario loads and how its clients log in; shared by every load scenario.
struct TargetOptions: ParsableArguments {
    @Option(help: "host:port of a running XMPP server to load instead of starting starling. Its accounts PREFIX0, PREFIX1, ... must exist with --password.")
    var target: String?
    @Option(help: "PID of the --target server, for its CPU and memory figures.") var serverPid: Int32?
    @Option(help: "Domain of the accounts.") var domain = "localhost"
    @Option(help: "Account names are this prefix and a number.") var accountPrefix = "bench"
    @Option(help: "Password of every account.") var password = "bench"
    @Option(help: "none, starttls or direct.") var tls = LoadTLS.none
    @Option(help: "tcp, or websocket (RFC 7395; the starling this tool starts gets an http listener, HTTPS with --tls direct).")
    var transport = LoadTransport.tcp
    @Option(help: "Path of the WebSocket endpoint (ejabberd: /ws, Prosody: /xmpp-websocket).") var websocketPath = "/xmpp-websocket"
    @Flag(help: "The starling this tool starts serves Prometheus metrics (on its http listener), so they are kept up to date.") var metrics = false
    @Option(help: "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-1.") var mechanism = "PLAIN"
    @Flag(help: "Log in with SASL2 and Bind2 (XEP-0388, XEP-0386): one exchange instead of SASL, stream restart and bind.") var sasl2 = false
    @Option(help: "The starling executable to start (default: next to this tool).") var server: String?
    @Option(help: "Event-loop threads of the generator.") var threads = 1
    @Option(help: "A YAML file appended to the config of the starling this tool starts (a modules: section, say; use absolute paths).")
    var serverConfig: String?
    @Flag(help: "Create each account by in-band registration (XEP-0077) before logging in (for --target servers).") var register = false
    @Option(help: "Spread connections over source addresses 127.0.0.1 ... 127.0.0.N (each holds ~28k ports).") var sourceAddresses = 1
    @Option(help: "Storage of the starling this tool starts: sqlite, or postgresql (with --postgres-url; the database is emptied first).")
    var backend = "sqlite"
    @Option(help: "PostgreSQL URL for --backend postgresql.") var postgresURL: String?
    @Option(help: "Start a cluster of this many starling nodes on the PostgreSQL database (--backend postgresql): connection i goes to node i % N, so the two ends of a chat pair are on different nodes. CPU and memory figures are the nodes' sums.")
    var clusterNodes = 1
    @Option(help: "Start this many starling servers, each serving its own domain (the --domain with the server's number: localhost0, localhost1, ...) and federating with the others over s2s on loopback (dialback over TLS, as between two self-signed servers): connection i logs in to server i % N, so the two ends of a chat pair are on different servers. CPU and memory figures are the servers' sums.")
    var federatedServers = 1
    @Option(help: "limits.read_rate of the starling this tool starts, in bytes/s per client (default: 0, no limit, for load runs; flood: the server's default).")
    var readRate: Int?

    func validate() throws {
        if transport == .websocket && tls == .starttls { throw ValidationError("--transport websocket takes --tls none or direct (WebSocket has no STARTTLS)") }
        if federatedServers > 1 && clusterNodes > 1 { throw ValidationError("--federated-servers and --cluster-nodes do not combine") }
    }

    /// The domain connection `index` logs in to (one per server when federating).
    func domain(for index: Int) -> String {
        federatedServers > 1 ? "\(domain)\(index % federatedServers)" : domain
    }

    func login(_ index: Int) -> LoginSpec {
        LoginSpec(domain: domain(for: index), username: "\(accountPrefix)\(index)", password: password, mechanism: mechanism, tls: tls,
                  transport: transport, webSocketPath: websocketPath, register: register, sasl2: sasl2)
    }

    func sourceAddress(for index: Int) -> String? {
        sourceAddresses > 1 ? "127.0.0.\(1 + index % sourceAddresses)" : nil
    }
}

/// The server a scenario runs against: a release `starling` this tool starts on loopback with its own
/// accounts, or any XMPP server given by address.
final class ServerUnderTest {
    let name: String
    let host: String
    /// The port of each node (one unless a cluster was started).
    let ports: [Int]
    let pids: [Int32]
    private let processes: [Process]
    private let workDirectory: URL?
    /// The first node's configuration.
    private let configPath: String?

    private init(name: String, host: String, ports: [Int], pids: [Int32], processes: [Process], workDirectory: URL?, configPath: String?) {
        self.name = name
        self.host = host
        self.ports = ports
        self.pids = pids
        self.processes = processes
        self.workDirectory = workDirectory
        self.configPath = configPath
    }

    /// The first node's port.
    var port: Int { ports[0] }
    var pid: Int32? { pids.first }

    /// Where connection `index` logs in.
    func port(for index: Int) -> Int { ports[index % ports.count] }

    /// The `--target` server, or a fresh starling with `accounts` accounts (and `defaultConfig` appended to
    /// its config when no `--server-config` is given).
    /// - Parameter seed: fills the fresh starling's storage before it starts.
    /// - Parameter serverReadRate: keep the server's default `limits.read_rate` unless `--read-rate` says
    ///   otherwise (load runs lift it).
    static func prepare(_ options: TargetOptions, accounts: Int, defaultConfig: String = "", serverReadRate: Bool = false,
                        seed: (any StarlingStore) async throws -> Void = { _ in }) async throws -> ServerUnderTest {
        raiseFileLimit()
        if let target = options.target {
            guard let colon = target.lastIndex(of: ":"), let port = Int(target[target.index(after: colon)...]) else {
                throw ValidationError("--target must be host:port")
            }
            return ServerUnderTest(name: "target", host: String(target[..<colon]), ports: [port], pids: options.serverPid.map { [$0] } ?? [], processes: [],
                                   workDirectory: nil, configPath: nil)
        }
        return try await startStarling(options, accounts: accounts, defaultConfig: defaultConfig,
                                       readRate: options.readRate ?? (serverReadRate ? nil : 0), seed: seed)
    }

    private static func startStarling(_ options: TargetOptions, accounts: Int, defaultConfig: String, readRate: Int?,
                                      seed: (any StarlingStore) async throws -> Void) async throws -> ServerUnderTest {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("starling-bench-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        let federated = max(1, options.federatedServers)
        let nodes = max(1, options.clusterNodes, federated)
        if options.clusterNodes > 1 && options.backend != "postgresql" { throw ValidationError("--cluster-nodes needs --backend postgresql") }
        if federated > 1 && options.backend != "sqlite" { throw ValidationError("--federated-servers keeps each server's accounts in its own SQLite file") }
        try "bench-cluster-secret-0123456789".write(to: work.appendingPathComponent("cluster.secret"), atomically: true, encoding: .utf8)
        // Federated servers reach each other at fixed loopback ports, known before they start.
        let s2sPorts = try (0..<federated).map { _ in try freePort() }
        var configPaths: [String] = []
        for node in 0..<nodes {
            let directory = nodes == 1 ? work : work.appendingPathComponent("node\(node)")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            let configPath = directory.appendingPathComponent("starling.yml").path
            let cluster = options.clusterNodes <= 1 ? "" : "cluster: { name: bench, node: n\(node), link: \"127.0.0.1:0\", secret_file: \(work.path)/cluster.secret }"
            let domain = federated > 1 ? "\(options.domain)\(node)" : options.domain
            var s2s = ""
            if federated > 1 {
                let routes = (0..<federated).filter { $0 != node }.map { "\(options.domain)\($0): \"127.0.0.1:\(s2sPorts[$0])\"" }.joined(separator: ", ")
                s2s = "s2s: { ca_file: \"\", routes: { \(routes) } }"
            }
            let s2sListener = federated > 1 ? "\n  - { type: s2s, address: 127.0.0.1, port: \(s2sPorts[node]), backlog: 1024 }" : ""
            // Plaintext PLAIN is allowed only because this server listens on loopback for a load run.
            try """
            hosts: [\(domain)]
            data_dir: data
            log_level: warning
            listeners:
              - { address: 127.0.0.1, port: 0, tls: starttls, backlog: 65535 }
              - { address: 127.0.0.1, port: 0, tls: direct, backlog: 65535 }
              - { type: http, address: 127.0.0.1, port: 0, tls: \(options.tls == .direct ? "direct" : "none"), backlog: 65535, metrics: \(options.metrics) }\(s2sListener)
            \(s2s)
            tls:
              required: \(options.tls != .none)
            auth:
              plain_without_tls: true
            limits: { max_unauthenticated_per_address: 0, max_connections_per_address: 0, connection_rate: 0\(readRate.map { ", read_rate: \($0)" } ?? "") }
            \(try storageSection(options))
            \(cluster)
            \(try options.serverConfig.map { try String(contentsOfFile: $0, encoding: .utf8) } ?? defaultConfig)
            """.write(toFile: configPath, atomically: true, encoding: .utf8)
            configPaths.append(configPath)
        }
        // One derivation shared by every bench account: registering thousands stays quick. A cluster's nodes
        // share one database; federated servers each have their own, with the accounts of their domain.
        let credentials = SCRAMHash.allCases.map { SCRAMCredentials.generate(password: options.password, hash: $0, iterations: 4096) }
        for (server, configPath) in configPaths.enumerated() where server == 0 || federated > 1 {
            let configuration = try StarlingConfiguration.load(path: configPath, moduleCatalog: BuiltinModules.descriptors)
            try FileManager.default.createDirectory(atPath: configuration.dataDirectory, withIntermediateDirectories: true)
            if configuration.storage.backend == .postgresql { try emptyDatabase(configuration.storage.url ?? "") }
            let store = try await StorageBackends.open(configuration, logger: Logger(label: "bench"))
            for index in 0..<accounts where federated == 1 || index % federated == server {
                try await store.createAccount(username: "\(options.accountPrefix)\(index)", host: options.domain(for: index), credentials: credentials)
            }
            do { if server == 0 { try await seed(store) } } catch {
                await store.close()
                throw error
            }
            await store.close()
        }

        let executable = options.server ?? URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
            .deletingLastPathComponent().appendingPathComponent("starling").path
        var processes: [Process] = []
        var ports: [Int] = []
        for configPath in configPaths {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = ["--config", configPath]
            let output = Pipe()
            process.standardOutput = output
            try process.run()
            processes.append(process)
            let announcement: ServerAnnouncement
            do { announcement = try readAnnouncement(output) } catch {
                for process in processes { process.terminate() }
                throw error
            }
            // Each node is ready once it has linked to the nodes already running.
            switch options.transport {
            case .tcp: ports.append(options.tls == .direct ? announcement.directTLSPort : announcement.starttlsPort)
            case .websocket: ports.append(options.tls == .direct ? announcement.httpsPort : announcement.httpPort)
            }
        }
        let name = nodes == 1 ? "starling" : federated > 1 ? "starling s2s x\(nodes)" : "starling x\(nodes)"
        return ServerUnderTest(name: name, host: "127.0.0.1", ports: ports,
                               pids: processes.map(\.processIdentifier), processes: processes, workDirectory: work, configPath: configPaths[0])
    }

    /// A loopback TCP port that was free a moment ago (the federated servers' s2s ports must be known
    /// before any of them starts, to route to each other).
    private static func freePort() throws -> Int {
        let socket = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(socket) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(socket, $0, length) == 0 && getsockname(socket, $0, &length) == 0 }
        }
        guard bound else { throw ValidationError("cannot find a free port") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    private static func storageSection(_ options: TargetOptions) throws -> String {
        switch options.backend {
        case "sqlite": return ""
        case "postgresql":
            guard let url = options.postgresURL else { throw ValidationError("--backend postgresql needs --postgres-url") }
            return "storage: { backend: postgresql, url: \"\(url)\", pool: 20 }"
        default: throw ValidationError("--backend must be sqlite or postgresql")
        }
    }

    /// A run starts from an empty database, so figures do not depend on what earlier runs left.
    private static func emptyDatabase(_ url: String) throws {
        let psql = Process()
        psql.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        psql.arguments = ["psql", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", "DROP SCHEMA public CASCADE; CREATE SCHEMA public;"]
        try psql.run()
        psql.waitUntilExit()
        guard psql.terminationStatus == 0 else { throw ValidationError("cannot empty the database at \(url) (psql failed)") }
    }

    /// The server's `starlingctl status` counters of one module (the starling this tool started only).
    func moduleCounters(_ module: String) -> [String: Int] {
        guard let configPath else { return [:] }
        let ctl = Process()
        ctl.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent().appendingPathComponent("starlingctl")
        ctl.arguments = ["status", "--config", configPath]
        let output = Pipe()
        ctl.standardOutput = output
        guard (try? ctl.run()) != nil else { return [:] }
        let data = output.fileHandleForReading.readDataToEndOfFile()
        ctl.waitUntilExit()
        guard let status = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let modules = status["modules"] as? [String: [String: Int]] else { return [:] }
        return modules.first { $0.key.hasSuffix("/\(module)") }?.value ?? [:]
    }

    /// Waits (up to a minute) until the server's archive queue is empty.
    func waitForArchive() async throws {
        for _ in 0..<600 {
            if (moduleCounters("mam")["archive_queued"] ?? 0) == 0 { return }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    func stop() {
        for process in processes where process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
        if let workDirectory { try? FileManager.default.removeItem(at: workDirectory) }
    }

    /// Summed over the nodes.
    var rss: Int? { pids.isEmpty ? nil : pids.map(ProcStat.rss).reduce(0, +) }
    var cpuSeconds: Double? { pids.isEmpty ? nil : pids.map(ProcStat.cpuSeconds).reduce(0, +) }

    private static func readAnnouncement(_ pipe: Pipe) throws -> ServerAnnouncement {
        var text = ""
        while true {
            if let announcement = ServerAnnouncement(output: text) { return announcement }
            let data = pipe.fileHandleForReading.availableData
            if data.isEmpty { throw ValidationError("the server exited before it was ready") }
            text += String(decoding: data, as: UTF8.self)
        }
    }

    /// Thousands of sockets need more than the usual soft limit of 1,024 files, in this process and in
    /// the server it starts.
    private static func raiseFileLimit() {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    }
}

/// Resource use, from /proc and getrusage.
enum ProcStat {
    static func rss(pid: Int32) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kilobytes = Int(line.split(separator: " ", omittingEmptySubsequences: true)[1])
        else { return 0 }
        return kilobytes * 1024
    }

    static func cpuSeconds(pid: Int32) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")")
        else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the command name.
        let ticks = (Double(fields[11]) ?? 0) + (Double(fields[12]) ?? 0)
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// CPU seconds this process (the generator) has used.
    static var ownCPUSeconds: Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        let user = Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6
        let system = Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6
        return user + system
    }
}

/// Prints one scenario result as a single JSON line.
func printResult(_ result: [String: Any]) throws {
    print(String(decoding: try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys]), as: UTF8.self))
}
