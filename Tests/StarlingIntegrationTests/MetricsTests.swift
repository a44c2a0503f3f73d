import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Prometheus metrics at /metrics of an http listener with `metrics: true`, as they change with traffic,
/// and the Grafana dashboard in examples/ asking only for series that exist.
final class MetricsTests: XCTestCase {
    func scrape(_ port: Int) async throws -> [String: Double] {
        let (data, response) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!)
        XCTAssertEqual((response as? HTTPURLResponse)?.statusCode, 200)
        XCTAssertTrue((response as? HTTPURLResponse)?.value(forHTTPHeaderField: "Content-Type")?.hasPrefix("text/plain; version=0.0.4") ?? false)
        var samples: [String: Double] = [:]
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            samples[String(line[..<space])] = value
        }
        return samples
    }

    func testCountersFollowTrafficAndTheDashboardAsksForExistingSeries() async throws {
        let server = try ServerProcess(extraConfig: "modules:\n  disco: {}\n  roster: {}\n  presence: {}\n  offline: {}\n  mam: {}\n  muc: {}\n  lua: { scripts: [count.lua, boom.lua] }\n",
                                       users: [("m1", "pw1"), ("m2", "pw2"), ("m3", "pw3")],
                                       files: ["count.lua": "starling.hook('message-in', function(stanza) end)\n",
                                               "boom.lua": "starling.hook('message-in', function(stanza) if stanza.body == 'boom' then error('boom') end end)\n"],
                                       extraListeners: ["{ type: http, address: 127.0.0.1, port: 0, metrics: true }"])
        defer { XCTAssertEqual(server.stop(), 0) }
        let before = try await scrape(server.httpPort)
        XCTAssertEqual(before["starling_client_connections{transport=\"tcp\"}"], 0)
        XCTAssertEqual(before["starling_logins_total{mechanism=\"scram\",result=\"success\"}"], 0)

        let a = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "m1", password: "pw1", resource: "r")
        let b = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "m2", password: "pw2", resource: "r")
        do {
            _ = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "m1", password: "wrong", resource: "x")
            XCTFail("a wrong password logged in")
        } catch {}
        for index in 0..<5 { a.send("<message to='m2@localhost/r' type='chat'><body>\(index)</body></message>") }
        for _ in 0..<5 { _ = try await b.expect("message") { $0.name == "message" } }

        let after = try await scrape(server.httpPort)
        // The two sessions, and the refused login's connection if the server has not seen it close yet.
        XCTAssertGreaterThanOrEqual(after["starling_client_connections{transport=\"tcp\"}"] ?? 0, 2)
        XCTAssertEqual(after["starling_client_connections{transport=\"websocket\"}"], 0)
        XCTAssertEqual(after["starling_sessions"], 2)
        XCTAssertEqual(after["starling_logins_total{mechanism=\"scram\",result=\"success\"}"], 2)
        XCTAssertEqual(after["starling_logins_total{mechanism=\"scram\",result=\"failure\"}"], 1)
        XCTAssertGreaterThanOrEqual(after["starling_stanzas_received_total{kind=\"message\"}"] ?? 0, 5)
        XCTAssertGreaterThanOrEqual(after["starling_stanzas_delivered_total{kind=\"message\"}"] ?? 0, 5)
        // The Lua hook ran once per message at least.
        let luaCalls = "starling_module_value{host=\"localhost\",module=\"lua\",name=\"calls\"}"
        XCTAssertEqual(before[luaCalls], 0)
        XCTAssertGreaterThanOrEqual(after[luaCalls] ?? 0, 5)

        // Latencies and outcomes: hooks per module, Lua scripts, storage operations, TLS handshakes, routing.
        a.send("<message to='m3@localhost' type='chat'><body>boom</body></message>")
        _ = try await a.iq("<iq type='get' id='sync' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", id: "sync")
        let later = try await scrape(server.httpPort)
        let hook = "{host=\"localhost\",hook=\"stanza-from-client\",module=\"lua\"}"
        XCTAssertGreaterThanOrEqual(later["starling_hook_calls_total\(hook)"] ?? 0, 6)
        XCTAssertGreaterThanOrEqual(later["starling_hook_duration_seconds_count\(hook)"] ?? 0, 1)
        XCTAssertNotNil(later["starling_hook_duration_seconds_bucket{host=\"localhost\",hook=\"stanza-from-client\",module=\"lua\",le=\"0.000001\"}"],
                        later.keys.filter { $0.hasPrefix("starling_hook_duration_seconds_bucket") }.sorted().prefix(3).description)
        XCTAssertEqual(later["starling_lua_failures_total{host=\"localhost\",script=\"boom.lua\",reason=\"error\"}"], 1)
        XCTAssertEqual(later["starling_lua_failures_total{host=\"localhost\",script=\"count.lua\",reason=\"error\"}"] ?? 0, 0)
        XCTAssertGreaterThanOrEqual(later["starling_lua_call_duration_seconds_count{host=\"localhost\",script=\"count.lua\"}"] ?? 0, 1)
        XCTAssertGreaterThanOrEqual(later["starling_routing_outcomes_total{outcome=\"offline\"}"] ?? 0, 1, "the message to m3, who is away")
        XCTAssertGreaterThanOrEqual(later["starling_tls_handshakes_total{result=\"success\"}"] ?? 0, 3)
        XCTAssertGreaterThanOrEqual(later["starling_tls_handshake_duration_seconds_count"] ?? 0, 3)
        let credentialLookups = later.filter { $0.key.hasPrefix("starling_storage_operation_duration_seconds_count{") && $0.key.contains("store=\"account\",operation=\"credentials\"") }
        XCTAssertGreaterThanOrEqual(credentialLookups.values.first ?? 0, 3, later.keys.filter { $0.contains("storage") }.sorted().description)
        XCTAssertEqual(later.filter { $0.key.hasPrefix("starling_storage_errors_total{") }.values.reduce(0, +), 0)
        XCTAssertGreaterThan(after["process_resident_memory_bytes"] ?? 0, 1_000_000)
        XCTAssertGreaterThan(after["process_open_fds"] ?? 0, 5)

        // Every series the dashboard charts is served.
        let dashboardURL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("examples/grafana/starling-dashboard.json")
        let dashboard = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: dashboardURL)) as? [String: Any])
        let expressions = (dashboard["panels"] as? [[String: Any]] ?? []).flatMap { ($0["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String } }
        XCTAssertGreaterThan(expressions.count, 8)
        let served = Set(after.keys.map { String($0.prefix { $0 != "{" }) })
        let functions: Set = ["sum", "by", "rate", "irate", "increase", "avg", "max", "min", "histogram_quantile"]
        for expression in expressions {
            let identifiers = try NSRegularExpression(pattern: "[a-z_]+(?=[{\\[() ,]|$)")
            let names = identifiers.matches(in: expression, range: NSRange(expression.startIndex..., in: expression))
                .map { String(expression[Range($0.range, in: expression)!]) }.filter { !functions.contains($0) && $0.contains("_") }
            XCTAssertFalse(names.isEmpty, expression)
            // A histogram's series are its name with _bucket, _sum and _count.
            for name in names { XCTAssertTrue(served.contains(name) || served.contains(name + "_count"), "\(name) (in \(expression)) is not served") }
        }
        await a.close()
        await b.close()
    }

    func testPrometheusParsesAndScrapesTheMetrics() async throws {
        let server = try ServerProcess(users: [("p1", "pw1")], extraListeners: ["{ type: http, address: 127.0.0.1, port: 0, metrics: true }"])
        defer { XCTAssertEqual(server.stop(), 0) }
        let client = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "p1", password: "pw1", resource: "r")
        defer { Task { await client.close() } }

        // Prometheus's own Python parser reads the whole exposition.
        let parse = """
        import sys, urllib.request
        from prometheus_client.parser import text_string_to_metric_families
        text = urllib.request.urlopen(sys.argv[1]).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                print(sample.name, sample.labels.get('mechanism', ''), sample.labels.get('result', ''), sample.value)
        """
        let (status, parsed) = try ServerProcess.run("/usr/bin/env", ["python3", "-c", parse, "http://127.0.0.1:\(server.httpPort)/metrics"])
        XCTAssertEqual(status, 0, parsed)
        XCTAssertTrue(parsed.contains("starling_logins_total scram success 1.0"), parsed)
        XCTAssertTrue(parsed.contains("process_resident_memory_bytes"), parsed)

        // A real Prometheus (Debian's) scrapes the listener, and its query API returns the series.
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/prometheus") else {
            throw XCTSkip("Prometheus is not installed (scripts/bootstrap installs Debian's prometheus)")
        }
        let prometheusPort = try ServerProcess.freePort()
        let config = server.directory.appendingPathComponent("prometheus.yml")
        try """
        global: { scrape_interval: 1s }
        scrape_configs:
          - job_name: starling
            static_configs: [{ targets: ["127.0.0.1:\(server.httpPort)"] }]
        """.write(to: config, atomically: true, encoding: .utf8)
        let prometheus = try ServerProcess.startDaemon("/usr/bin/prometheus", [
            "--config.file=\(config.path)", "--storage.tsdb.path=\(server.directory.appendingPathComponent("prometheus").path)",
            "--web.listen-address=127.0.0.1:\(prometheusPort)",
        ])
        defer { prometheus.terminate(); prometheus.waitUntilExit() }
        var query = URLComponents(string: "http://127.0.0.1:\(prometheusPort)/api/v1/query")!
        query.queryItems = [URLQueryItem(name: "query", value: "starling_logins_total{mechanism=\"scram\",result=\"success\"}")]
        var answer = ""
        // Prometheus starts, then scrapes once a second: wait until the series is in (a minute at most).
        for _ in 0..<120 where !answer.contains("\"result\":[{") {
            try await Task.sleep(for: .milliseconds(500))
            if let (data, _) = try? await URLSession.shared.data(from: query.url!) { answer = String(decoding: data, as: UTF8.self) }
        }
        XCTAssertTrue(answer.contains("\"job\":\"starling\""), answer)
        XCTAssertTrue(answer.contains("\"1\"]"), "the value is one login: \(answer)")
    }

    func testMetricsAreServedOnlyWhereEnabled() async throws {
        let server = try ServerProcess(users: [], extraListeners: ["{ type: http, address: 127.0.0.1, port: 0 }"])
        defer { XCTAssertEqual(server.stop(), 0) }
        let (_, response) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(server.httpPort)/metrics")!)
        XCTAssertEqual((response as? HTTPURLResponse)?.statusCode, 404)
    }
}
