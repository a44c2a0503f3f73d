import ArgumentParser
import Foundation
import Logging
import StarlingSQLite
import StarlingPostgres
import StarlingStorage
import StarlingAPI

@main
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "starling-bench",
        abstract: "Load scenarios against a starling it starts (release build) or any XMPP server given with --target. Prints one JSON line per run.",
        subcommands: [Idle.self, Chat.self, Storm.self, OfflineStoreThroughput.self]
    )
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
        try printResult(["scenario": "offline-store", "backend": backend, "messages": messages,
                         "concurrency": concurrency, "seconds": seconds, "messages_per_second": Double(messages) / seconds])
    }
}
