import ArgumentParser
import Foundation
import Logging
import StarlingConfig
import StarlingModules
import StarlingSASL
import StarlingSQLite
import StarlingPostgres
import StarlingStorage
import StarlingTestClient
import StarlingAPI

@main
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "starling-bench",
        abstract: "Load scenarios against a starling server started by this tool. Prints one JSON line per run.",
        subcommands: [Idle.self, OfflineStoreThroughput.self]
    )
}

/// Logs in N sessions, holds them, and reports the server's memory per session and the login rate.
struct Idle: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "N logged-in idle sessions: server RSS per session, login rate.")

    @Option(help: "Sessions to log in (stay under ~19,000: a process here may open 20,000 files).") var sessions = 1000
    @Option(help: "Logins in flight at once.") var concurrency = 50
    @Option(help: "starttls, direct, or none (plaintext on the STARTTLS port; the server then allows auth without TLS).") var tls = "starttls"
    @Option(help: "SASL mechanism.") var mechanism = "SCRAM-SHA-256"
    @Option(help: "Seconds to hold the sessions before measuring.") var settle = 3.0
    @Option(help: "The starling executable (default: next to this tool).") var server: String?

    func run() async throws {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("starling-bench-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: work) }
        let configPath = work.appendingPathComponent("starling.yml").path
        try """
        hosts: [localhost]
        data_dir: data
        log_level: warning
        listeners:
          - { address: 127.0.0.1, port: 0, tls: starttls, backlog: 4096 }
          - { address: 127.0.0.1, port: 0, tls: direct, backlog: 4096 }
        tls:
          required: \(tls != "none")
        """.write(toFile: configPath, atomically: true, encoding: .utf8)
        let configuration = try StarlingConfiguration.load(path: configPath, moduleCatalog: BuiltinModules.descriptors)
        try FileManager.default.createDirectory(atPath: configuration.dataDirectory, withIntermediateDirectories: true)

        // One derivation shared by every bench account: registering thousands stays quick.
        let store = try await SQLiteStore.open(path: configuration.storage.path, logger: Logger(label: "bench"))
        let credentials = SCRAMHash.allCases.map { SCRAMCredentials.generate(password: "bench", hash: $0, iterations: 4096) }
        for index in 0..<sessions {
            try await store.createAccount(username: "bench\(index)", host: "localhost", credentials: credentials)
        }
        await store.close()

        let executable = server ?? URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
            .deletingLastPathComponent().appendingPathComponent("starling").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = ["--config", configPath]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        defer { if process.isRunning { process.terminate(); process.waitUntilExit() } }
        let ports = try readPorts(output)
        let port = tls == "direct" ? ports.direct : ports.starttls

        try await Task.sleep(for: .seconds(1))
        let idleRSS = ProcStat.rss(pid: process.processIdentifier)
        let cpuBefore = ProcStat.cpuSeconds(pid: process.processIdentifier)
        let started = Date()
        var clients: [TestClient] = []
        clients.reserveCapacity(sessions)
        var next = 0
        try await withThrowingTaskGroup(of: TestClient.self) { group in
            func launch(_ index: Int) {
                group.addTask {
                    try await TestClient.login(port: port, domain: "localhost", tls: tls == "direct" ? .direct : tls == "none" ? .none : .starttls,
                                               username: "bench\(index)", password: "bench", mechanism: mechanism)
                }
            }
            while next < min(concurrency, sessions) { launch(next); next += 1 }
            while let client = try await group.next() {
                clients.append(client)
                if next < sessions { launch(next); next += 1 }
            }
        }
        let loginSeconds = Date().timeIntervalSince(started)
        let loginCPU = ProcStat.cpuSeconds(pid: process.processIdentifier) - cpuBefore
        try await Task.sleep(for: .seconds(settle))
        let loadedRSS = ProcStat.rss(pid: process.processIdentifier)
        let perSession = Double(loadedRSS - idleRSS) / Double(sessions)
        let result: [String: Any] = [
            "scenario": "idle", "tls": tls, "mechanism": mechanism, "sessions": clients.count,
            "server_rss_idle_bytes": idleRSS, "server_rss_loaded_bytes": loadedRSS,
            "server_bytes_per_session": Int(perSession),
            "logins_per_second": Double(sessions) / loginSeconds,
            "server_cpu_ms_per_login": loginCPU * 1000 / Double(sessions),
        ]
        print(String(decoding: try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys]), as: UTF8.self))
        for client in clients { try? await client.channel.close() }
    }

    private func readPorts(_ pipe: Pipe) throws -> (starttls: Int, direct: Int) {
        var text = ""
        while true {
            if let announcement = ServerAnnouncement(output: text) { return (announcement.starttlsPort, announcement.directTLSPort) }
            let data = pipe.fileHandleForReading.availableData
            if data.isEmpty { throw ValidationError("the server exited before it was ready") }
            text += String(decoding: data, as: UTF8.self)
        }
    }
}

/// Another process's resource use, from /proc.
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
}

/// Write throughput of the offline-message store on either backend (messages/s).
struct OfflineStoreThroughput: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "offline-store", abstract: "Offline-message store writes per second, per backend.")

    @Option(help: "sqlite or postgresql.") var backend = "sqlite"
    @Option(help: "PostgreSQL URL (for --backend postgresql).") var url: String?
    @Option(help: "Messages to store.") var messages = 20000
    @Option(help: "Recipients they are spread over.") var users = 100
    @Option(help: "Writes in flight at once.") var concurrency = 32

    func run() async throws {
        let logger = Logger(label: "bench")
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("starling-bench-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: work) }
        let store: any StarlingStore
        switch backend {
        case "postgresql":
            guard let url else { throw ValidationError("--url is needed for postgresql") }
            store = try await PostgresStore.open(.init(url: url, poolSize: concurrency), logger: logger)
        default:
            store = try await SQLiteStore.open(path: work.appendingPathComponent("bench.sqlite").path, logger: logger)
        }
        let host = "bench\(UInt32.random(in: 0...UInt32.max)).example"
        let body = "<message from='a@\(host)/r' to='b@\(host)' type='chat'><body>\(String(repeating: "x", count: 100))</body><delay xmlns='urn:xmpp:delay' stamp='2026-11-29T00:00:00Z'/></message>"
        let started = Date()
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func launch(_ index: Int) {
                group.addTask {
                    _ = try await store.storeOffline(body, for: JID("u\(index % users)@\(host)")!, limit: Int.max)
                }
            }
            while next < min(concurrency, messages) { launch(next); next += 1 }
            while try await group.next() != nil {
                if next < messages { launch(next); next += 1 }
            }
        }
        let seconds = Date().timeIntervalSince(started)
        for index in 0..<users { _ = try await store.takeOffline(for: JID("u\(index)@\(host)")!) }
        await store.close()
        let result: [String: Any] = ["scenario": "offline-store", "backend": backend, "messages": messages,
                                     "concurrency": concurrency, "seconds": seconds, "messages_per_second": Double(messages) / seconds]
        print(String(decoding: try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys]), as: UTF8.self))
    }
}
