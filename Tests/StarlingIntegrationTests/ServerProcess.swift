import Foundation
#if canImport(Glibc)
import Glibc
#endif
import StarlingAPI
import StarlingTestClient
import XCTest

/// The real `starling` executable, started on loopback with ephemeral ports and a temporary data
/// directory, and stopped with SIGTERM like an operator would.
final class ServerProcess {
    let directory: URL
    let configPath: String
    let process = Process()
    private(set) var starttlsPort = 0
    private(set) var directTLSPort = 0
    private(set) var httpPort = 0
    private(set) var httpsPort = 0
    private(set) var adminPort = 0
    private(set) var s2sPort = 0
    private let output = Pipe()
    private let errors: FileHandle
    let errorLogPath: String

    static var buildDirectory: URL {
        // The test bundle sits next to the products it was built with.
        var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        while url.path != "/" && !FileManager.default.fileExists(atPath: url.appendingPathComponent("starling").path) {
            url.deleteLastPathComponent()
        }
        return url
    }

    static func executable(_ name: String) -> String { buildDirectory.appendingPathComponent(name).path }

    enum Backend {
        case sqlite, postgresql
    }

    /// The PostgreSQL `scripts/test` started, if any.
    static var postgresURL: String? { ProcessInfo.processInfo.environment["STARLING_TEST_POSTGRES_URL"] }

    /// The backend end-to-end tests run on: SQLite, unless STARLING_TEST_BACKEND=postgresql (scripts/test
    /// runs the end-to-end suite once more that way).
    static var defaultBackend: Backend {
        ProcessInfo.processInfo.environment["STARLING_TEST_BACKEND"] == "postgresql" ? .postgresql : .sqlite
    }

    /// `files` are written into the server's directory (next to its config) before it starts.
    /// `database`: a PostgreSQL URL to use instead of a fresh database (nodes of one cluster share one).
    /// `users` are registered on the first of `hosts`.
    init(extraConfig: String = "", users: [(String, String)], backend: Backend = ServerProcess.defaultBackend, storageTimeout: Double = 5,
         files: [String: String] = [:], database: String? = nil, listenerOptions: String = "", extraListeners: [String] = [],
         hosts: [String] = ["localhost", "example.test"]) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        for (path, contents) in files { try Self.write(contents, to: directory.appendingPathComponent(path)) }
        configPath = directory.appendingPathComponent("starling.yml").path
        var storage = ""
        if let database {
            storage = "storage: { backend: postgresql, url: \"\(database)\", timeout: \(storageTimeout) }"
        } else if backend == .postgresql {
            guard let base = Self.postgresURL else { throw XCTSkip("no PostgreSQL: run scripts/test") }
            storage = "storage: { backend: postgresql, url: \"\(try Self.freshDatabase(base))\", timeout: \(storageTimeout) }"
        }
        let config = """
        hosts: [\(hosts.joined(separator: ", "))]
        data_dir: data
        log_level: \(ProcessInfo.processInfo.environment["STARLING_TEST_LOG_LEVEL"] ?? "info")
        listeners:
          - { address: 127.0.0.1, port: 0, tls: starttls\(listenerOptions) }
          - { address: 127.0.0.1, port: 0, tls: direct\(listenerOptions) }\(extraListeners.map { "\n  - \($0)" }.joined())
        \(extraConfig.hasPrefix("auth:") ? "" : "auth:\n  failure_delay: 0.2")
        \(storage)
        \(extraConfig)
        """
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        for (user, password) in users {
            let (status, text) = try Self.run(Self.executable("starlingctl"), ["register", user, hosts[0], password, "--config", configPath])
            XCTAssertEqual(status, 0, text)
        }
        errorLogPath = directory.appendingPathComponent("server.log").path
        _ = FileManager.default.createFile(atPath: errorLogPath, contents: nil)
        errors = FileHandle(forWritingAtPath: errorLogPath)!
        try launch()
    }

    /// The same server started again (same directory, configuration and database) after `previous`
    /// stopped; the directory now belongs to the new one.
    init(restarting previous: ServerProcess) throws {
        precondition(!previous.process.isRunning, "stop the server before restarting it")
        directory = previous.directory
        configPath = previous.configPath
        previous.ownsDirectory = false
        errorLogPath = directory.appendingPathComponent("server.log").path
        errors = FileHandle(forWritingAtPath: errorLogPath)!
        errors.seekToEndOfFile()
        try launch()
    }

    /// Whether this object removes the directory when it goes away.
    private var ownsDirectory = true

    private func launch() throws {
        process.executableURL = URL(fileURLWithPath: Self.executable("starling"))
        process.arguments = ["--config", configPath]
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        try waitUntilReady()
    }

    private func waitUntilReady() throws {
        let reader = output.fileHandleForReading
        var text = ""
        let deadline = Date().addingTimeInterval(60)
        while true {
            if let announcement = ServerAnnouncement(output: text) {
                starttlsPort = announcement.starttlsPort
                directTLSPort = announcement.directTLSPort
                httpPort = announcement.httpPort
                httpsPort = announcement.httpsPort
                adminPort = announcement.adminPort
                s2sPort = announcement.s2sPort
                return
            }
            guard Date() < deadline, process.isRunning else {
                throw NSError(domain: "ServerProcess", code: 1, userInfo: [NSLocalizedDescriptionKey:
                    "server did not start: \(text) \((try? String(contentsOfFile: errorLogPath, encoding: .utf8)) ?? "")"])
            }
            let data = reader.availableData
            if data.isEmpty { Thread.sleep(forTimeInterval: 0.05) }
            text += String(decoding: data, as: UTF8.self)
        }
    }

    /// A TCP port on 127.0.0.1 that was free a moment ago, for configuration that must name its port
    /// before the server starts (a URL in a module's options).
    static func freePort() throws -> Int {
        let socket = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(socket) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Bool in
                bind(socket, pointer, length) == 0 && getsockname(socket, pointer, &length) == 0
            }
        }
        guard bound else { throw NSError(domain: "ServerProcess", code: 2, userInfo: [NSLocalizedDescriptionKey: "no free port"]) }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// A new, empty database on the test cluster, so each server starts from nothing.
    static func freshDatabase(_ base: String) throws -> String {
        let name = "starling_\(UUID().uuidString.prefix(8).lowercased())"
        let (status, output) = try run("/usr/bin/env", ["psql", base, "-v", "ON_ERROR_STOP=1", "-qc", "CREATE DATABASE \(name)"])
        guard status == 0 else { throw NSError(domain: "ServerProcess", code: 2, userInfo: [NSLocalizedDescriptionKey: "createdb failed: \(output)"]) }
        var components = URLComponents(string: base)!
        components.path = "/\(name)"
        return components.string!
    }

    /// Writes a file in the server's directory (scripts it loads, for example).
    func write(_ contents: String, to path: String) throws {
        try Self.write(contents, to: directory.appendingPathComponent(path))
    }

    /// A file starting with "#!" is made executable.
    private static func write(_ contents: String, to url: URL) throws {
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try contents.write(to: url, atomically: true, encoding: .utf8)
        if contents.hasPrefix("#!") { chmod(url.path, 0o755) }
    }

    /// Runs `starlingctl` against this server's config.
    func ctl(_ arguments: [String]) throws -> (Int32, String) {
        try Self.run(Self.executable("starlingctl"), arguments + ["--config", configPath])
    }

    var log: String { (try? String(contentsOfFile: errorLogPath, encoding: .utf8)) ?? "" }

    /// SIGTERM, then wait for a clean exit.
    @discardableResult
    func stop() -> Int32 {
        if process.isRunning {
            process.terminate()
            let deadline = Date().addingTimeInterval(20)
            while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        try? errors.close()
        return process.terminationStatus
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        // STARLING_TEST_KEEP=1 leaves the directories (configuration, server.log) for a look after a failure.
        if ownsDirectory && ProcessInfo.processInfo.environment["STARLING_TEST_KEEP"] == nil { try? FileManager.default.removeItem(at: directory) }
    }

    static func run(_ executable: String, _ arguments: [String], stdin: String? = nil) throws -> (Int32, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        if let stdin {
            let input = Pipe()
            process.standardInput = input
            try process.run()
            input.fileHandleForWriting.write(Data(stdin.utf8))
            try input.fileHandleForWriting.close()
        } else {
            try process.run()
        }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// Starts a command that starts a daemon (pg_ctl start) and returns at once: its output goes nowhere,
    /// and the caller checks the daemon by using it. (Launched from the test process, `pg_ctl -w` was
    /// seen to linger long after the server was up.) Terminate the returned process when done.
    static func startDaemon(_ executable: String, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Starts slixmpp's `echo` mode as `jid` on direct TLS and returns once it says READY (or it ended,
    /// with what it printed); it answers `count` chat messages with "echo: <body>", then exits 0.
    static func slixmppEcho(port: Int, jid: String, password: String, count: Int) throws -> (process: Process, output: String) {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Interop/slixmpp_client.py").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", script, "echo", "--port", "\(port)", "--tls", "direct", "--jid-a", jid, "--password-a", password, "--count", "\(count)"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        return (process, readUntilReady(pipe))
    }

    /// What a helper process printed up to its READY line (or up to its end, if it stopped first).
    private static func readUntilReady(_ pipe: Pipe) -> String {
        var output = ""
        while !output.contains("READY") {
            let data = pipe.fileHandleForReading.availableData
            if data.isEmpty { break }
            output += String(decoding: data, as: UTF8.self)
        }
        return output
    }

    /// A name server on 127.0.0.1:`port` answering from `zone` (Tests/Interop/dns_server.py), running once
    /// it says READY; terminate the process when done.
    static func nameServer(zone: String, port: Int) throws -> Process {
        let interop = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Interop")
        let zoneFile = FileManager.default.temporaryDirectory.appendingPathComponent("zone-\(UUID().uuidString)").path
        try zone.write(toFile: zoneFile, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", interop.appendingPathComponent("dns_server.py").path, zoneFile, "\(port)"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        guard readUntilReady(pipe).contains("READY") else {
            throw TestClientError.unexpected("the name server did not start (is dnslib installed? scripts/bootstrap)")
        }
        return process
    }

    /// Runs the slixmpp client script (Tests/Interop/slixmpp_client.py).
    static func slixmpp(_ arguments: [String]) throws -> (Int32, String) {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Interop/slixmpp_client.py").path
        return try run("/usr/bin/env", ["python3", script] + arguments)
    }
}

extension XCTestCase {
    /// Sends a chat message with `body` to `to`.
    func send(_ client: TestClient, to: String, _ body: String) {
        var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["to": to, "type": "chat"])
        var element = XMLElement(name: "body", namespace: Namespace.client)
        element.children = [.text(body)]
        message.append(element)
        client.send(message)
    }

    /// The next message `client` receives, skipping everything else.
    func nextMessage(_ client: TestClient, timeout: Double = 10) async throws -> XMLElement {
        let event = try await client.waitFor(timeout: timeout, "a message") { event in
            if case .element(let element) = event { return element.name == "message" }
            return false
        }
        guard case .element(let element) = event else { throw TestClientError.unexpected("\(event)") }
        return element
    }
}

/// Whether something accepts TCP connections at `host:port` (IPv4) right now.
func acceptsConnections(port: Int, host: String = "127.0.0.1") -> Bool {
    let socket = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(socket) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr(host)
    return withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(socket, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
}
