import ArgumentParser
import Foundation
import NIOCore
import NIOPosix

/// One client sends as fast as it can while ordinary pairs chat at a modest rate, with archiving on:
/// how much the server grows, and what the ordinary clients' latency is meanwhile.
struct Flood: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "One session floods another flat out while P pairs chat at --rate; archiving on. Reports server growth and the pairs' latency.")

    @OptionGroup var options: TargetOptions
    @Option(help: "Pairs chatting at --rate meanwhile.") var pairs = 50
    @Option(help: "Total messages per second the pairs send.") var rate = 500.0
    @Option(help: "Messages the flooder keeps unread by its recipient (its send-ahead).") var window = 20_000
    @Option(help: "Seconds of flooding.") var seconds = 15.0
    @Option(help: "Seconds to wait for messages still in flight after sending stops.") var drain = 30.0

    func validate() throws {
        guard pairs > 0, seconds > 0, window > 0, rate > 0 else { throw ValidationError("pairs, seconds, window and rate must be positive") }
    }

    func run() async throws {
        let server = try await ServerUnderTest.prepare(options, accounts: pairs * 2 + 2, defaultConfig: Chat.modules(archiving: true), serverReadRate: true)
        defer { server.stop() }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(2, options.threads))
        defer { group.shutdownGracefully { _ in } }
        let loops = Array(group.makeIterator())
        // The flood has a loop of its own, so the pairs' latency is the server's, not the generator's.
        let (connections, errors) = await logIn(count: pairs * 2 + 2, concurrency: 100, options: options, server: server) { index in
            index >= pairs * 2 ? loops[0] : loops[1 + (index / 2) % (loops.count - 1)]
        }
        guard errors.isEmpty else { throw LoadError(reason: "\(errors.count) logins failed; first: \(errors[0])") }

        let drivers = loops.dropFirst().map { TrafficDriver(.chat, loop: $0, perSenderRate: rate / Double(pairs * 2), window: 1) }
        for pair in 0..<pairs {
            let a = connections[pair * 2]!, b = connections[pair * 2 + 1]!
            a.partnerAddress = "\(b.spec.username)@\(b.spec.domain)"
            b.partnerAddress = "\(a.spec.username)@\(a.spec.domain)"
            a.partner = b
            b.partner = a
            a.sendPhase = Double(pair * 2) / Double(pairs * 2)
            b.sendPhase = Double(pair * 2 + 1) / Double(pairs * 2)
            drivers[pair % drivers.count].connections += [a, b]
        }
        let flooder = connections[pairs * 2]!, sink = connections[pairs * 2 + 1]!
        flooder.partnerAddress = "\(sink.spec.username)@\(sink.spec.domain)"
        let flood = FloodDriver(loop: loops[0], sender: flooder, receiver: sink, window: window)
        try await Task.sleep(for: .milliseconds(500))

        let rssBefore = server.rss ?? 0
        let serverCPU = server.cpuSeconds
        let start = DispatchTime.now().uptimeNanoseconds
        for driver in drivers { driver.loop.execute { driver.begin(at: start) } }
        flood.loop.execute { flood.begin() }
        var rssPeak = rssBefore
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            rssPeak = max(rssPeak, server.rss ?? 0)
            try await Task.sleep(for: .milliseconds(100))
        }
        for driver in drivers { driver.loop.execute { driver.stopSending() } }
        flood.loop.execute { flood.stop() }
        let counters = server.moduleCounters("mam")
        var totals = TrafficDriver.Totals()
        var flooded = (sent: 0, received: 0)
        let drainDeadline = Date().addingTimeInterval(drain)
        while true {
            rssPeak = max(rssPeak, server.rss ?? 0)
            totals = TrafficDriver.Totals()
            for driver in drivers { totals.add(try await driver.loop.submit { driver.totals() }.get()) }
            flooded = try await flood.loop.submit { (flooder.sent, sink.received) }.get()
            if (totals.received + totals.errors >= totals.sent && flooded.received >= flooded.sent) || Date() > drainDeadline { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        try await server.waitForArchive()
        let serverSeconds = server.cpuSeconds.flatMap { now in serverCPU.map { now - $0 } }
        var latencies: [UInt64] = []
        for driver in drivers { latencies += try await driver.loop.submit { driver.latencies }.get() }
        latencies.sort()
        func percentile(_ p: Double) -> Double {
            latencies.isEmpty ? 0 : Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]) / 1e6
        }
        var result: [String: Any] = [
            "scenario": "flood", "server": server.name, "read_rate": options.readRate.map { "\($0)" } ?? "server default", "tls": options.tls.rawValue, "backend": options.backend, "pairs": pairs, "rate": rate,
            "seconds": seconds, "flood_sent": flooded.sent, "flood_delivered": flooded.received,
            "flood_delivered_per_second": Double(flooded.received) / seconds,
            "pairs_sent": totals.sent, "pairs_delivered": totals.received, "lost": totals.sent - totals.received + flooded.sent - flooded.received,
            "pairs_latency_ms_p50": percentile(0.5), "pairs_latency_ms_p99": percentile(0.99), "pairs_latency_ms_max": percentile(1),
            "server_rss_before_bytes": rssBefore, "server_rss_peak_bytes": rssPeak, "server_rss_growth_bytes": rssPeak - rssBefore,
        ]
        if let serverSeconds { result["server_cpu_seconds"] = serverSeconds }
        for (name, value) in counters { result["during_" + name] = value }
        for (name, value) in server.moduleCounters("mam") { result[name] = value }
        try printResult(result)
        for connection in connections.values { connection.loop.execute { connection.close() } }
        if totals.received != totals.sent || flooded.received != flooded.sent {
            throw LoadError(reason: "messages were not delivered: pairs \(totals.sent - totals.received), flood \(flooded.sent - flooded.received)")
        }
    }
}

/// Keeps `window` of the flooder's messages unread by its recipient, topping up on every read: as
/// fast as the server takes them, with a deep send-ahead. Only touched on `loop`.
final class FloodDriver: @unchecked Sendable {
    let loop: any EventLoop
    private let sender: LoadConnection
    private let receiver: LoadConnection
    private let window: Int
    private var sending = false

    init(loop: any EventLoop, sender: LoadConnection, receiver: LoadConnection, window: Int) {
        self.loop = loop
        self.sender = sender
        self.receiver = receiver
        self.window = window
    }

    func begin() {
        sending = true
        receiver.onReadComplete = { [weak self] in self?.refill() }
        refill()
    }

    func stop() { sending = false }

    private func refill() {
        guard sending, sender.sent - receiver.received < window else { return }
        // In slices, so the loop also reads (and so refills) while the window is deep.
        var budget = 1000
        while sender.sent - receiver.received < window && budget > 0 {
            sender.sendChat()
            budget -= 1
        }
        sender.flush()
        if sender.sent - receiver.received < window { loop.execute { self.refill() } }
    }
}
