import ArgumentParser
import Foundation
import NIOCore
import NIOPosix
import StarlingConfig
import StarlingSASL

/// Logs in `count` connections with at most `concurrency` logins in flight; connection `i` is account `i`,
/// logging in as `spec(i)` (by default as the options say). Returns the connections that made it and the
/// reasons the others did not.
func logIn(count: Int, concurrency: Int, options: TargetOptions, server: ServerUnderTest,
           spec: ((Int) -> LoginSpec)? = nil,
           loop: @escaping @Sendable (Int) -> any EventLoop) async -> (connections: [Int: LoadConnection], errors: [String]) {
    var connections: [Int: LoadConnection] = [:]
    var errors: [String] = []
    await withTaskGroup(of: (Int, Result<LoadConnection, any Error>).self) { group in
        var next = 0
        func launch(_ index: Int) {
            let spec = spec?(index) ?? options.login(index)
            let source = options.sourceAddress(for: index)
            let host = server.host, port = server.port(for: index)
            group.addTask {
                do {
                    return (index, .success(try await LoadConnection.login(spec, host: host, port: port, sourceAddress: source, on: loop(index)).get()))
                } catch {
                    return (index, .failure(error))
                }
            }
        }
        while next < min(concurrency, count) { launch(next); next += 1 }
        while let (index, result) = await group.next() {
            switch result {
            case .success(let connection): connections[index] = connection
            case .failure(let error): errors.append("\(error)")
            }
            if next < count { launch(next); next += 1 }
        }
    }
    return (connections, errors)
}

/// Logs in N sessions and holds them: server memory per session and the login rate.
struct Idle: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "N logged-in idle sessions: server RSS per session, logins/s, server CPU per login.")

    @OptionGroup var options: TargetOptions
    @Option(help: "Sessions to log in (a process here may open 20,000 files).") var sessions = 1000
    @Option(help: "Logins in flight at once.") var concurrency = 100
    @Option(help: "Seconds to hold the sessions before measuring memory.") var settle = 3.0
    @Flag(help: "Enable stream management with resumption on every session, then also drop every connection and measure the detached sessions.")
    var streamManagement = false

    func run() async throws {
        try printResult(try await LoginRun(scenario: "idle", options: options, count: sessions, concurrency: concurrency, settle: settle,
                                           streamManagement: streamManagement).run())
    }
}

/// Thousands of clients connecting at once.
struct Storm: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "N clients connecting at once: time until all are in, errors.")

    @OptionGroup var options: TargetOptions
    @Option(help: "Clients.") var clients = 5000
    @Flag(help: "A reconnect storm with FAST tokens (XEP-0484): every client first logs in once over SASL2 with --mechanism, asking for a token, and disconnects (not measured); then all reconnect at once, each logging in with its token (HT-SHA-256-NONE) and Bind2 in one round trip. Needs --tls.")
    var fast = false

    func validate() throws {
        if fast && options.tls == .none { throw ValidationError("--fast needs --tls starttls or direct (FAST is offered over TLS only)") }
    }

    func run() async throws {
        var run = LoginRun(scenario: "storm", options: options, count: clients, concurrency: clients, settle: 0, streamManagement: false)
        run.fast = fast
        try printResult(try await run.run())
    }
}

/// The shared body of `idle` and `storm`.
struct LoginRun {
    var scenario: String
    var options: TargetOptions
    var count: Int
    var concurrency: Int
    var settle: Double
    /// XEP-0198 with resumption on every session; afterwards the connections are cut and the detached
    /// sessions measured too.
    var streamManagement: Bool
    /// Measure logins with FAST tokens, which a first, unmeasured round of password logins obtains.
    var fast = false

    func run() async throws -> [String: Any] {
        let server = try await ServerUnderTest.prepare(options, accounts: count)
        defer { server.stop() }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: options.threads)
        defer { group.shutdownGracefully { _ in } }
        let loops = Array(group.makeIterator())
        var spec: ((Int) -> LoginSpec)?
        if fast {
            let tokens = try await obtainTokens(server: server) { loops[$0 % loops.count] }
            spec = { index in
                var spec = options.login(index)
                spec.sasl2 = true
                spec.fastToken = tokens[index]
                return spec
            }
        }
        try await Task.sleep(for: .seconds(1))
        let idleRSS = server.rss
        let serverCPU = server.cpuSeconds
        let generatorCPU = ProcStat.ownCPUSeconds
        let started = DispatchTime.now()
        let (connections, errors) = await logIn(count: count, concurrency: concurrency, options: options, server: server, spec: spec) { loops[$0 % loops.count] }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9
        var result: [String: Any] = [
            "scenario": scenario, "server": server.name, "tls": options.tls.rawValue,
            "mechanism": fast ? HashedTokenMechanism.sha256None.rawValue : options.mechanism, "sasl2": options.sasl2 || fast,
            "clients": count, "logged_in": connections.count, "errors": errors.count,
            "seconds": seconds, "logins_per_second": Double(connections.count) / seconds,
            "generator_cpu_seconds": ProcStat.ownCPUSeconds - generatorCPU,
        ]
        if let first = errors.first { result["first_error"] = first }
        if let serverCPU, let now = server.cpuSeconds {
            result["server_cpu_seconds"] = now - serverCPU
            result["server_cpu_ms_per_login"] = (now - serverCPU) * 1000 / Double(max(connections.count, 1))
        }
        if streamManagement {
            for connection in connections.values {
                try await connection.loop.flatSubmit {
                    connection.request("<enable xmlns='urn:xmpp:sm:3' resume='true'/>", until: "<enabled")
                }.get()
            }
            result["stream_management"] = true
        }
        if settle > 0 { try await Task.sleep(for: .seconds(settle)) }
        if let idleRSS, let loadedRSS = server.rss {
            result["server_rss_idle_bytes"] = idleRSS
            result["server_rss_loaded_bytes"] = loadedRSS
            result["server_bytes_per_session"] = (loadedRSS - idleRSS) / max(connections.count, 1)
        }
        for connection in connections.values { connection.loop.execute { connection.close() } }
        if streamManagement {
            // Cut without </stream>: each session now waits, detached, to be resumed.
            try await Task.sleep(for: .seconds(max(settle, 1)))
            if let idleRSS, let detachedRSS = server.rss {
                result["server_rss_detached_bytes"] = detachedRSS
                result["server_bytes_per_detached_session"] = (detachedRSS - idleRSS) / max(connections.count, 1)
            }
        }
        guard errors.isEmpty else {
            try printResult(result)
            throw LoadError(reason: "\(errors.count) of \(count) logins failed; first: \(errors[0])")
        }
        return result
    }
}

extension LoginRun {
    /// Logs every account in once over SASL2 asking for a FAST token, and disconnects; returns the tokens.
    func obtainTokens(server: ServerUnderTest, loop: @escaping @Sendable (Int) -> any EventLoop) async throws -> [Int: String] {
        let (connections, errors) = await logIn(count: count, concurrency: 100, options: options, server: server, spec: { index in
            var spec = options.login(index)
            spec.sasl2 = true
            spec.requestToken = HashedTokenMechanism.sha256None.rawValue
            return spec
        }, loop: loop)
        guard errors.isEmpty else { throw LoadError(reason: "\(errors.count) logins asking for a FAST token failed; first: \(errors[0])") }
        var tokens: [Int: String] = [:]
        for (index, connection) in connections {
            tokens[index] = try await connection.loop.submit { connection.issuedToken }.get()
            connection.loop.execute { connection.close() }
        }
        guard tokens.count == count else { throw LoadError(reason: "\(count - tokens.count) logins got no FAST token (is FAST on, and TLS?)") }
        // The server handles the logouts (presence, last activity) before the measured logins start.
        var last = server.cpuSeconds
        for _ in 0..<120 {
            try await Task.sleep(for: .milliseconds(500))
            let now = server.cpuSeconds
            if let before = last, let now, now - before < 0.02 { break }
            last = now
        }
        return tokens
    }
}

/// P pairs of sessions messaging each other: delivered/s, server CPU per 1,000 messages, latency.
struct Chat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "P pairs exchanging one-to-one messages at a fixed total rate or flat out.")

    @OptionGroup var options: TargetOptions
    @Option(help: "Pairs of sessions; each session sends to its partner.") var pairs = 50
    @Option(help: "Total messages per second offered; 0 sends flat out (each sender keeps --window unanswered messages in flight).") var rate = 0.0
    @Option(help: "Messages in flight per sender when flat out.") var window = 16
    @Option(help: "Seconds of sending.") var seconds = 10.0
    @Option(help: "Seconds to wait for messages still in flight after sending stops.") var drain = 10.0
    @Flag(help: "Archive every message (the mam module) on the starling this tool starts; without it, the default modules except mam.")
    var archiving = false

    func validate() throws {
        guard pairs > 0, seconds > 0, window > 0, rate >= 0 else { throw ValidationError("pairs, seconds and window must be positive") }
    }

    /// The default modules, with or without message archiving.
    static func modules(archiving: Bool) -> String {
        let names = StarlingConfiguration.defaultModules.filter { archiving || $0 != "mam" }
        return "modules:\n" + names.map { "  \($0): {}\n" }.joined()
    }

    func run() async throws {
        let server = try await ServerUnderTest.prepare(options, accounts: pairs * 2, defaultConfig: Self.modules(archiving: archiving))
        defer { server.stop() }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: options.threads)
        defer { group.shutdownGracefully { _ in } }
        let loops = Array(group.makeIterator())
        // Both sessions of a pair share a loop, so a pair's counters are only touched on that loop.
        let (connections, errors) = await logIn(count: pairs * 2, concurrency: 100, options: options, server: server) { loops[($0 / 2) % loops.count] }
        guard errors.isEmpty else { throw LoadError(reason: "\(errors.count) logins failed; first: \(errors[0])") }

        let drivers = loops.map { TrafficDriver(.chat, loop: $0, perSenderRate: rate / Double(pairs * 2), window: window) }
        for pair in 0..<pairs {
            let a = connections[pair * 2]!, b = connections[pair * 2 + 1]!
            a.partnerAddress = "\(b.spec.username)@\(b.spec.domain)"
            b.partnerAddress = "\(a.spec.username)@\(a.spec.domain)"
            a.partner = b
            b.partner = a
            a.sendPhase = Double(pair * 2) / Double(pairs * 2)
            b.sendPhase = Double(pair * 2 + 1) / Double(pairs * 2)
            drivers[pair % loops.count].connections += [a, b]
        }
        // Presence and roster traffic from the logins settle before the clock starts.
        try await Task.sleep(for: .milliseconds(500))

        let serverCPU = server.cpuSeconds
        let generatorCPU = ProcStat.ownCPUSeconds
        let start = DispatchTime.now().uptimeNanoseconds
        for driver in drivers { driver.loop.execute { driver.begin(at: start) } }
        try await Task.sleep(for: .seconds(seconds))
        for driver in drivers { driver.loop.execute { driver.stopSending() } }
        var totals = TrafficDriver.Totals()
        let drainDeadline = DispatchTime.now().uptimeNanoseconds + UInt64(drain * 1e9)
        while true {
            totals = TrafficDriver.Totals()
            for driver in drivers { totals.add(try await driver.loop.submit { driver.totals() }.get()) }
            if totals.received + totals.errors >= totals.sent || DispatchTime.now().uptimeNanoseconds > drainDeadline { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        // Archiving is part of the cost: the figures include it once the archive queue is empty.
        if archiving { try await server.waitForArchive() }
        let serverSeconds = server.cpuSeconds.flatMap { now in serverCPU.map { now - $0 } }
        let generatorSeconds = ProcStat.ownCPUSeconds - generatorCPU
        var latencies: [UInt64] = []
        for driver in drivers { latencies += try await driver.loop.submit { driver.latencies }.get() }
        latencies.sort()
        func percentile(_ p: Double) -> Double {
            latencies.isEmpty ? 0 : Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]) / 1e6
        }
        let elapsed = Double(totals.lastReceipt > start ? totals.lastReceipt - start : 1) / 1e9
        var result: [String: Any] = [
            "scenario": "chat", "server": server.name, "tls": options.tls.rawValue, "pairs": pairs,
            "offered_per_second": rate, "window": rate == 0 ? window : 0, "seconds": seconds,
            "sent": totals.sent, "delivered": totals.received, "errors": totals.errors, "lost": totals.sent - totals.received,
            "delivered_per_second": Double(totals.received) / elapsed,
            "latency_ms_p50": percentile(0.5), "latency_ms_p99": percentile(0.99), "latency_ms_max": percentile(1),
            "generator_cpu_seconds": generatorSeconds,
        ]
        if let serverSeconds {
            result["server_cpu_seconds"] = serverSeconds
            result["server_cpu_seconds_per_1000"] = serverSeconds * 1000 / Double(max(totals.received, 1))
        }
        if archiving {
            result["archiving"] = true
            for (name, value) in server.moduleCounters("mam") { result[name] = value }
        }
        try printResult(result)
        for connection in connections.values { connection.loop.execute { connection.close() } }
        if totals.received != totals.sent { throw LoadError(reason: "\(totals.sent - totals.received) of \(totals.sent) messages were not delivered") }
    }
}

/// Drives the senders on one event loop; only touched on that loop. Chat senders write to their partner
/// and count what it received; groupchat senders write to their room and count what it reflected.
final class TrafficDriver: @unchecked Sendable {
    enum Kind {
        case chat, groupchat
    }

    struct Totals {
        var sent = 0, received = 0, errors = 0
        var lastReceipt: UInt64 = 0
        mutating func add(_ other: Totals) {
            sent += other.sent
            received += other.received
            errors += other.errors
            lastReceipt = max(lastReceipt, other.lastReceipt)
        }
    }

    let loop: any EventLoop
    var connections: [LoadConnection] = []
    private(set) var latencies: [UInt64] = []
    private let kind: Kind
    private let perSenderRate: Double
    private let window: Int
    private var sending = false
    private var start: UInt64 = 0
    private var lastReceipt: UInt64 = 0
    private var timer: RepeatedTask?

    init(_ kind: Kind, loop: any EventLoop, perSenderRate: Double, window: Int) {
        self.kind = kind
        self.loop = loop
        self.perSenderRate = perSenderRate
        self.window = window
    }

    func begin(at start: UInt64) {
        self.start = start
        sending = true
        latencies.reserveCapacity(1 << 16)
        for connection in connections {
            // Weak: at the end of a run the server's last stanzas can still arrive after the driver is gone.
            connection.onMessage = { [weak self] stamp, _ in
                guard let self else { return }
                let now = DispatchTime.now().uptimeNanoseconds
                lastReceipt = now
                latencies.append(now &- stamp)
            }
        }
        if perSenderRate > 0 {
            timer = loop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(1)) { [weak self] _ in self?.tick() }
        } else {
            // Flat out: whenever a session has read, the sender whose messages it counts tops its window up.
            for connection in connections {
                let sender = kind == .chat ? connection.partner! : connection
                connection.onReadComplete = { [weak self, weak sender] in
                    guard let self, let sender else { return }
                    refill(sender)
                }
            }
            for connection in connections { refill(connection) }
        }
    }

    func stopSending() {
        sending = false
        timer?.cancel()
    }

    func totals() -> Totals {
        var totals = Totals(lastReceipt: lastReceipt)
        for connection in connections {
            totals.sent += connection.sent
            totals.received += connection.received
            totals.errors += connection.receivedErrors
        }
        return totals
    }

    private func send(_ connection: LoadConnection) {
        switch kind {
        case .chat: connection.sendChat()
        case .groupchat: connection.sendGroupchat()
        }
    }

    /// The sender's messages not yet received by its partner, or not yet reflected by its room.
    private func unanswered(_ sender: LoadConnection) -> Int {
        switch kind {
        case .chat: return sender.sent - sender.partner!.received
        case .groupchat: return sender.sent - sender.echoed
        }
    }

    private func refill(_ sender: LoadConnection) {
        guard sending, unanswered(sender) < window else { return }
        while unanswered(sender) < window { send(sender) }
        sender.flush()
    }

    private func tick() {
        guard sending else { return }
        let intervals = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 * perSenderRate
        for connection in connections {
            let due = Int(intervals + 1 - connection.sendPhase)
            guard connection.sent < due else { continue }
            while connection.sent < due { send(connection) }
            connection.flush()
        }
    }
}
