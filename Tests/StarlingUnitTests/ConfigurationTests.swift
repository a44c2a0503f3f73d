import Foundation
@testable import StarlingConfig
import StarlingModules
import XCTest

final class ConfigurationTests: XCTestCase, ConfigParsing {
    func testDefaultsFromAnEmptyFile() throws {
        let configuration = try parse("")
        XCTAssertEqual(configuration.hosts, ["localhost"])
        XCTAssertEqual(configuration.limits.maxStanzaSize, 262_144)
        XCTAssertEqual(configuration.limits.maxSessionsPerUser, 10)
        XCTAssertEqual(configuration.listeners.map(\.port), [5222, 5223])
        XCTAssertEqual(configuration.listeners.map(\.backlog), [1024, 1024])
        XCTAssertTrue(configuration.tls.required)
        XCTAssertEqual(configuration.storage.path, "/etc/starling/var/starling.sqlite")
    }

    func testAFullFile() throws {
        let configuration = try parse("""
        hosts: [Example.COM, chat.example.com]
        log_level: debug
        listeners:
          - { address: 127.0.0.1, port: 15222, tls: starttls, backlog: 4096 }
          - port: 15223
            tls: direct
        limits:
          max_stanza_size: 65536
        storage:
          path: /srv/starling/db.sqlite
        """)
        XCTAssertEqual(configuration.hosts, ["example.com", "chat.example.com"])
        XCTAssertEqual(configuration.listeners, [
            ListenerConfiguration(address: "127.0.0.1", port: 15222, tls: .starttls, backlog: 4096),
            ListenerConfiguration(address: "0.0.0.0", port: 15223, tls: .direct, backlog: 1024),
        ])
        XCTAssertEqual(configuration.limits.maxStanzaSize, 65536)
        XCTAssertEqual(configuration.storage.path, "/srv/starling/db.sqlite")
    }

    func testHTTPListeners() throws {
        let configuration = try parse("""
        listeners:
          - port: 5222
          - { type: http, address: 127.0.0.1, trusted_proxies: [127.0.0.1, "::1"] }
          - { type: http, port: 5443, tls: direct, websocket_url: "wss://chat.example.com/ws" }
        """)
        XCTAssertEqual(configuration.listeners.map(\.port), [5222])
        XCTAssertEqual(configuration.httpListeners, [
            HTTPListenerConfiguration(address: "127.0.0.1", port: 5280, directTLS: false, backlog: 1024, trustedProxies: ["127.0.0.1", "::1"]),
            HTTPListenerConfiguration(address: "0.0.0.0", port: 5443, directTLS: true, backlog: 1024, trustedProxies: [],
                                      publicWebSocketURL: "wss://chat.example.com/ws"),
        ])
        XCTAssertEqual(try parse("").httpListeners, [], "no HTTP unless configured")
        expectError("listeners:\n  - type: http\n    tls: starttls\n", line: 3, key: "listeners[0].tls", contains: "not one of: none, direct")
        expectError("listeners:\n  - type: http\n    proxy_protocol: true\n", line: 3, key: "listeners[0].proxy_protocol", contains: "unknown option")
        expectError("listeners:\n  - type: ftp\n", line: 2, key: "listeners[0].type", contains: "not one of: c2s, s2s, http, admin")
    }

    func testAdminListenerIsLoopbackWithAToken() throws {
        let token = FileManager.default.temporaryDirectory.appendingPathComponent("admin-token-\(UUID().uuidString)").path
        try (String(repeating: "t", count: 32) + "\n").write(toFile: token, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: token) }
        let configuration = try parse("listeners:\n  - { type: admin, token_file: \(token) }\n")
        XCTAssertEqual(configuration.httpListeners, [
            HTTPListenerConfiguration(address: "127.0.0.1", port: 5281, directTLS: false, backlog: 1024, trustedProxies: [], servesXMPP: false, adminTokenFile: token),
        ])
        expectError("listeners:\n  - type: admin\n", line: 2, key: "listeners[0].token_file", contains: "needs a token_file")
        expectError("listeners:\n  - type: admin\n    token_file: /nonexistent/token\n", line: 3, key: "listeners[0].token_file", contains: "cannot read")
        expectError("listeners:\n  - type: admin\n    token_file: \(token)\n    websocket_url: x\n", line: 4, key: "listeners[0].websocket_url", contains: "unknown option")
    }

    func testErrorsNameFileLineAndKey() {
        expectError("hosts: [localhost]\nlimits:\n  max_stanza_sise: 1000\n", line: 3, key: "limits.max_stanza_sise", contains: "did you mean 'max_stanza_size'")
        expectError("limits:\n  max_stanza_size: 12\n", line: 2, key: "limits.max_stanza_size", contains: "out of range")
        expectError("limits:\n  max_stanza_size: big\n", line: 2, key: "limits.max_stanza_size", contains: "expected integer")
        expectError("\n\nlisteners:\n  - port: 5222\n    tls: maybe\n", line: 5, key: "listeners[0].tls", contains: "not one of: starttls, direct")
        expectError("hosts: [\"bad host\"]\n", line: 1, key: "hosts", contains: "not a valid domain")
        expectError("auth:\n  mechanisms: [SCRAM-SHA-256, DIGEST-MD5]\n", line: 2, key: "auth.mechanisms", contains: "unknown mechanism DIGEST-MD5")
        expectError("tls:\n  certificate: /etc/cert.pem\n", line: 2, key: "tls.key", contains: "set together")
        expectError("hosts: [a\nlimits: {", line: 2, key: nil, contains: "YAML syntax error")
        expectError("frobnicate: true\n", line: 1, key: "frobnicate", contains: "unknown option")
        expectError("- just\n- a list\n", line: 1, key: nil, contains: "must be a mapping")
    }

    func testFASTSettings() throws {
        let defaults = try parse("hosts: [localhost]\n").auth.fast
        XCTAssertEqual(defaults, FASTConfiguration())
        let configured = try parse("auth:\n  fast:\n    mechanisms: [HT-SHA-256-NONE]\n    token_lifetime: 7200\n    rotate_after: 3600\n    max_clients_per_account: 4\n").auth.fast
        XCTAssertEqual(configured.mechanisms, ["HT-SHA-256-NONE"])
        XCTAssertEqual([configured.tokenLifetime, configured.rotateAfter, configured.maxClientsPerAccount], [7200, 3600, 4])
        XCTAssertEqual(try parse("auth:\n  fast: { mechanisms: [] }\n").auth.fast.mechanisms, [], "FAST off")
        expectError("auth:\n  fast:\n    mechanisms: [HT-SHA-256-UNIQ]\n", line: 3, key: "auth.fast.mechanisms", contains: "unknown FAST mechanism HT-SHA-256-UNIQ")
        expectError("auth:\n  fast:\n    token_lifetime: 7200\n    rotate_after: 7200\n", line: 4, key: "auth.fast.rotate_after", contains: "less than token_lifetime")
        expectError("auth:\n  fast:\n    key_file: /nonexistent/key\n", line: 3, key: "auth.fast.key_file", contains: "cannot read")
        expectError("auth:\n  fast:\n    lifetime: 7200\n", line: 3, key: "auth.fast.lifetime", contains: "unknown option")
        let access = try parse("acl:\n  lan: { networks: [10.0.0.0/8] }\naccess_rules:\n  lan_only:\n    - allow: lan\nauth:\n  mechanism_access:\n    HT-SHA-256-NONE: lan_only\n")
        XCTAssertEqual(access.auth.mechanismAccess, ["HT-SHA-256-NONE": "lan_only"])
    }

    func testClusterSettingsAreCheckedWhereTheyAreWritten() throws {
        let secret = FileManager.default.temporaryDirectory.appendingPathComponent("cluster-secret-\(UUID().uuidString)").path
        try "0123456789abcdef0123".write(toFile: secret, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: secret) }
        let postgres = "storage: { backend: postgresql, url: \"postgresql://u@db/x\" }\n"
        let configuration = try parse(postgres + "cluster:\n  node: n1\n  link: 10.0.0.1:7070\n  secret_file: \(secret)\n  peers: [10.0.0.2:7070]\n")
        XCTAssertEqual(configuration.cluster, ClusterConfiguration(name: "starling", node: "n1", linkHost: "10.0.0.1", linkPort: 7070, secretFile: secret,
                                                                 discovery: .postgresql, peers: ["10.0.0.2:7070"], heartbeat: 1, deadAfter: 5))
        XCTAssertNil(try parse(postgres).cluster)
        expectError("cluster:\n  node: n1\n  link: 10.0.0.1:7070\n  secret_file: \(secret)\n", line: 2, key: "cluster", contains: "needs the postgresql storage backend")
        expectError(postgres + "cluster:\n  node: n1\n  link: nowhere\n  secret_file: \(secret)\n", line: 4, key: "cluster.link", contains: "HOST:PORT")
        expectError(postgres + "cluster:\n  node: n1\n  link: h:1\n  secret_file: /nonexistent/secret\n", line: 5, key: "cluster.secret_file", contains: "cannot read")
        expectError(postgres + "cluster:\n  node: n1\n  link: h:1\n  secret_file: \(secret)\n  peers: [h]\n", line: 6, key: "cluster.peers", contains: "not HOST:PORT")
        expectError(postgres + "cluster:\n  node: n1\n  link: h:0\n  secret_file: \(secret)\n  discovery: static\n  peers: [h:2]\n", line: 4, key: "cluster.link", contains: "fixed port")
        expectError(postgres + "cluster:\n  node: n1\n  link: h:1\n  secret_file: \(secret)\n  heartbeat: 2\n  dead_after: 3\n", line: 7, key: "cluster.dead_after", contains: "twice heartbeat")
    }

    func testFederationIsOnWithAnS2SListener() throws {
        XCTAssertNil(try parse("hosts: [a.test]\ns2s:\n  ca_file: \"\"\n").s2s)
        let configuration = try parse("""
        hosts: [a.test]
        listeners:
          - { port: 5222 }
          - { type: s2s, tls: direct }
        s2s:
          ca_file: ""
          blocked_domains: [Spam.Example]
          routes: { b.test: "10.0.0.2:5269", c.test: ["10.0.0.3:5270", "10.0.0.4:5269"] }
        """)
        let s2s = try XCTUnwrap(configuration.s2s)
        XCTAssertEqual(s2s.listeners, [ListenerConfiguration(address: "0.0.0.0", port: 5269, tls: .direct, backlog: 1024)])
        XCTAssertEqual(s2s.routes, ["b.test": ["10.0.0.2:5269"], "c.test": ["10.0.0.3:5270", "10.0.0.4:5269"]])
        XCTAssertEqual(s2s.blockedDomains, ["spam.example"])
        XCTAssertTrue(s2s.requireTLS)
        XCTAssertTrue(s2s.bidi)
        XCTAssertNil(s2s.caFile)
        let listener = "hosts: [a.test]\nlisteners:\n  - { type: s2s }\n"
        expectError(listener + "s2s:\n  ca_file: \"\"\n  routes: { b.test: nowhere }\n", line: 6, key: "s2s.routes.b.test", contains: "HOST:PORT")
        expectError(listener + "s2s:\n  ca_file: \"\"\n  routes: { a.test: \"h:1\" }\n", line: 6, key: "s2s.routes.a.test", contains: "host of this server")
        expectError(listener + "s2s:\n  ca_file: \"\"\n  dialback: false\n", line: 6, key: "s2s.dialback", contains: "set ca_file")
        expectError(listener + "s2s:\n  ca_file: /nonexistent/ca.pem\n", line: 5, key: "s2s.ca_file", contains: "cannot read")
        expectError(listener + "s2s:\n  queue_limit: 0\n", line: 5, key: "s2s.queue_limit", contains: "out of range")
        expectError(listener + "s2s:\n  ca_file: \"\"\n  dns_server: \"dns.example:53\"\n", line: 6, key: "s2s.dns_server", contains: "IPv4 address")
        XCTAssertEqual(try parse(listener + "s2s:\n  ca_file: \"\"\n  dns_server: \"127.0.0.53:53\"\n").s2s?.dnsServer, "127.0.0.53:53")
    }

    func testReferenceDocumentsEveryOption() {
        let reference = StarlingConfiguration.referenceText(moduleCatalog: BuiltinModules.descriptors)
        for key in ["hosts", "listeners[].port", "listeners[].backlog", "listeners[].trusted_proxies", "listeners[].websocket_url", "listeners[].token_file", "s2s.ca_file", "s2s.dialback", "s2s.blocked_domains", "tls.certificate", "auth.scram_iterations", "limits.max_stanza_size", "limits.max_sessions_per_user", "storage.path", "admin.socket"] {
            XCTAssertTrue(reference.contains("  \(key)  ("), "\(key) missing from the reference")
        }
    }
}
