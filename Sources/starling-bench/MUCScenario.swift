import ArgumentParser
import Foundation
import NIOCore
import NIOPosix

/// R rooms of N occupants each, every occupant sending groupchat messages: fan-out deliveries per second,
/// server CPU per 1,000 deliveries, latency from send to each delivery, and joins per second.
struct MUCLoad: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "muc", abstract: "R rooms of N occupants exchanging groupchat messages at a fixed rate or flat out.")

    @OptionGroup var options: TargetOptions
    @Option(help: "Rooms.") var rooms = 50
    @Option(help: "Occupants per room (each its own session).") var occupants = 20
    @Option(help: "Total messages per second sent to the rooms; 0 sends flat out (each occupant keeps --window of its own messages unreflected).")
    var rate = 0.0
    @Option(help: "An occupant's messages not yet reflected back to it, when flat out.") var window = 1
    @Option(help: "Seconds of sending.") var seconds = 10.0
    @Option(help: "Seconds to wait for deliveries still in flight after sending stops.") var drain = 10.0
    @Option(help: "The MUC service (default: conference.DOMAIN).") var service: String?

    func validate() throws {
        guard rooms > 0, occupants > 0, seconds > 0, window > 0, rate >= 0 else { throw ValidationError("rooms, occupants, seconds and window must be positive") }
    }

    /// For the starling this tool starts: the default modules, with MUC limits a load run needs.
    static let serverModules = """
    modules:
      disco: {}
      ping: {}
      roster: {}
      presence: {}
      muc: { message_rate: 100000, message_burst: 100000, max_occupants: 100000, max_rooms: 1000000, max_rooms_per_session: 1000 }
    """

    func run() async throws {
        let total = rooms * occupants
        let server = try await ServerUnderTest.prepare(options, accounts: total, defaultConfig: Self.serverModules)
        defer { server.stop() }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: options.threads)
        defer { group.shutdownGracefully { _ in } }
        let loops = Array(group.makeIterator())
        let (connections, errors) = await logIn(count: total, concurrency: 100, options: options, server: server) { loops[$0 % loops.count] }
        guard errors.isEmpty else { throw LoadError(reason: "\(errors.count) logins failed; first: \(errors[0])") }
        let service = self.service ?? "conference.\(options.domain)"
        let runID = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        for index in 0..<total {
            let connection = connections[index]!
            connection.roomAddress = "bench\(runID)r\(index / occupants)@\(service)"
            connection.number = index
        }

        // Each room's first occupant creates it and accepts the default configuration; then everyone else
        // enters (timed: joins per second).
        for room in 0..<rooms {
            let creator = connections[room * occupants]!
            _ = try await creator.loop.flatSubmit { creator.join(nick: "o0") }.get()
            _ = try await creator.loop.flatSubmit {
                creator.iq(id: "benchcfg", "<iq type='set' id='benchcfg' to='\(creator.roomAddress)'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>")
            }.get()
        }
        let joinStart = DispatchTime.now().uptimeNanoseconds
        let joinServerCPU = server.cpuSeconds
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<total where index % occupants != 0 {
                let connection = connections[index]!
                group.addTask { _ = try await connection.loop.flatSubmit { connection.join(nick: "o\(index % occupants)") }.get() }
            }
            try await group.waitForAll()
        }
        let joinSeconds = Double(DispatchTime.now().uptimeNanoseconds - joinStart) / 1e9
        let joinCPU = server.cpuSeconds.flatMap { now in joinServerCPU.map { now - $0 } }
        // Presence from the joins settles before the clock starts.
        try await Task.sleep(for: .milliseconds(500))

        let drivers = loops.map { TrafficDriver(.groupchat, loop: $0, perSenderRate: rate / Double(total), window: window) }
        for index in 0..<total { drivers[index % loops.count].connections.append(connections[index]!) }
        for (offset, driver) in drivers.enumerated() {
            for (position, connection) in driver.connections.enumerated() {
                connection.sendPhase = Double(position * drivers.count + offset) / Double(total)
            }
        }
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
            if totals.received + totals.errors * occupants >= totals.sent * occupants || DispatchTime.now().uptimeNanoseconds > drainDeadline { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        let serverSeconds = server.cpuSeconds.flatMap { now in serverCPU.map { now - $0 } }
        let generatorSeconds = ProcStat.ownCPUSeconds - generatorCPU
        var latencies: [UInt64] = []
        for driver in drivers { latencies += try await driver.loop.submit { driver.latencies }.get() }
        latencies.sort()
        func percentile(_ p: Double) -> Double {
            latencies.isEmpty ? 0 : Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]) / 1e6
        }
        let elapsed = Double(totals.lastReceipt > start ? totals.lastReceipt - start : 1) / 1e9
        let expected = totals.sent * occupants
        var result: [String: Any] = [
            "scenario": "muc", "server": server.name, "tls": options.tls.rawValue, "rooms": rooms, "occupants": occupants,
            "offered_per_second": rate, "window": rate == 0 ? window : 0, "seconds": seconds,
            "sent": totals.sent, "deliveries": totals.received, "expected_deliveries": expected, "errors": totals.errors,
            "lost": expected - totals.received, "deliveries_per_second": Double(totals.received) / elapsed,
            "latency_ms_p50": percentile(0.5), "latency_ms_p99": percentile(0.99), "latency_ms_max": percentile(1),
            "joins": total - rooms, "join_seconds": joinSeconds, "joins_per_second": Double(total - rooms) / joinSeconds,
            "generator_cpu_seconds": generatorSeconds,
        ]
        if let joinCPU { result["server_cpu_ms_per_join"] = joinCPU * 1000 / Double(max(total - rooms, 1)) }
        if let serverSeconds {
            result["server_cpu_seconds"] = serverSeconds
            result["server_cpu_seconds_per_1000_deliveries"] = serverSeconds * 1000 / Double(max(totals.received, 1))
        }
        try printResult(result)
        for connection in connections.values { connection.loop.execute { connection.close() } }
        if totals.received != expected { throw LoadError(reason: "\(expected - totals.received) of \(expected) deliveries did not arrive") }
    }
}
