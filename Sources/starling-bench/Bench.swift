import ArgumentParser
import Dispatch
import Foundation
import Logging
import StarlingSQLite
import StarlingPostgres
import StarlingStorage
import StarlingAPI
import StarlingLua
import StarlingServer

@main
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "starling-bench",
        abstract: "Load scenarios against a starling it starts (release build) or any XMPP server given with --target. Prints one JSON line per run.",
        subcommands: [Idle.self, Chat.self, Storm.self, MUCLoad.self, Flood.self, ArchiveQueries.self, OfflineStoreThroughput.self, HookCost.self, MetricsCost.self]
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

/// What one hook costs per stanza, measured in process: a no-op Lua handler (the whole path: marshalling
/// the stanza, the sandboxed call, reading the verdict) against a no-op Swift hook closure.
struct MetricsCost: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "metrics-cost",
        abstract: "Nanoseconds a hook call costs plainly and metered (a call counter, one call in 16 timed into a histogram), on 1 and 2 threads sharing the meter.")

    @Option(help: "Calls per thread to time.") var calls = 2_000_000

    func run() throws {
        var result: [String: Any] = ["scenario": "metrics-cost", "calls": calls]
        for threads in [1, 2] {
            let (plain, metered) = HookMeteringCost.nanosecondsPerCall(calls: calls, threads: threads)
            result["plain_ns_\(threads)_threads"] = plain
            result["metered_ns_\(threads)_threads"] = metered
        }
        try printResult(result)
    }
}

struct HookCost: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "hook-cost", abstract: "Nanoseconds per call of a no-op Lua hook, a Lua hook reading an attribute and the body, and a no-op Swift hook.")

    @Option(help: "Calls to time.") var calls = 1_000_000

    func run() throws {
        var stanza = XMLElement(name: "message", namespace: Namespace.client, attributes: [
            "from": "romeo@example.com/orchard", "to": "juliet@example.com", "type": "chat", "id": "m1",
        ])
        var body = XMLElement(name: "body", namespace: Namespace.client)
        body.children = [.text("Wherefore art thou, Romeo?")]
        stanza.append(body)
        let lua = try LuaScriptState(script: LuaScript(path: "noop.lua", source: "starling.hook('message-in', function(stanza) end)", failClosed: false),
                                     limits: LuaLimits(), services: LuaServices { _, _ in })
        // A typical policy check: one attribute and the body, so the stanza's fields are filled on demand.
        let reader = try LuaScriptState(script: LuaScript(path: "reads.lua", source: """
            starling.hook('message-in', function(stanza)
              if stanza.attr.to == 'blocked@example.com' or stanza.body == 'spam' then return 'drop' end
            end)
            """, failClosed: false), limits: LuaLimits(), services: LuaServices { _, _ in })
        let swiftHook: @Sendable (StanzaEvent) -> HookResult = { _ in .pass }
        let origin = JID("romeo@example.com/orchard")

        func time(_ body: () -> Void) -> Double {
            let start = DispatchTime.now().uptimeNanoseconds
            for _ in 0..<calls { body() }
            return Double(DispatchTime.now().uptimeNanoseconds - start) / Double(calls)
        }
        var passes = 0
        let luaNanoseconds = time { if lua.call(event: "message-in", priority: 0, stanza: stanza) == .pass { passes += 1 } }
        let luaReadingNanoseconds = time { if reader.call(event: "message-in", priority: 0, stanza: stanza) == .pass { passes += 1 } }
        let swiftNanoseconds = time { if case .pass = swiftHook(StanzaEvent(stanza: stanza, origin: origin)) { passes += 1 } }
        guard passes == calls * 3 else { throw ValidationError("a hook did not pass") }
        try printResult(["scenario": "hook-cost", "calls": calls, "lua_noop_ns_per_call": luaNanoseconds,
                         "lua_reading_to_and_body_ns_per_call": luaReadingNanoseconds, "swift_noop_ns_per_call": swiftNanoseconds])
    }
}
