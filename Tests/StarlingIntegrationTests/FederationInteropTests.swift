import Foundation
#if canImport(Glibc)
import Glibc
#endif
import StarlingAPI
import StarlingTestClient
import XCTest

/// Federation with the servers operators run today: Debian's Prosody 0.12 and ejabberd 23.01, each
/// started by the test on its own loopback address with its own domain and a self-signed certificate
/// (so the streams authenticate with dialback over TLS). They find our domain through DNS like in
/// production: each runs in a mount namespace whose /etc/hosts names our loopback address, and falls
/// back from SRV to the address record on port 5269. Ours reaches theirs through `s2s.routes`.
final class FederationInteropTests: XCTestCase {
    /// A loopback /24 of its own per run (two runs of the suite may overlap in CI), and one address per server in it.
    private let network = "127.\(Int.random(in: 64...250)).\(Int.random(in: 1...250))"
    private var starlingAddress: String { "\(network).2" }
    private var prosodyAddress: String { "\(network).3" }
    private var ejabberdAddress: String { "\(network).4" }

    override func setUpWithError() throws {
        for tool in ["/usr/bin/prosody", "/usr/bin/prosodyctl", "/usr/sbin/ejabberdctl", "/usr/bin/setpriv", "/usr/bin/unshare", "/usr/bin/openssl"]
        where !FileManager.default.isExecutableFile(atPath: tool) {
            throw XCTSkip("\(tool) is missing: scripts/bootstrap installs Debian's prosody and ejabberd")
        }
        // A private /etc/hosts needs a mount namespace, and the servers switch to their own users.
        guard getuid() == 0 else { throw XCTSkip("the peers run in a mount namespace of their own, which takes root") }
    }

    /// `a.test` on Starling, federating with `peer` at `address`.
    private func startStarling(peer: String, address: String) throws -> ServerProcess {
        try ServerProcess(extraConfig: """
        s2s:
          ca_file: ""
          routes: { \(peer): "\(address):5269" }
        """, users: [("alice", "alice-pass")], extraListeners: ["{ type: s2s, address: \(starlingAddress), port: 5269 }"], hosts: ["a.test"])
    }

    /// Our user and theirs subscribe to each other, see each other online, and exchange a message each way.
    /// - Parameter bidirectional: the peer agrees to XEP-0288 on our stream.
    private func exchange(starling: ServerProcess, peerClient: TestClient, peerJID: String, bidirectional: Bool) async throws {
        let alice = try await TestClient.login(port: starling.starttlsPort, domain: "a.test", tls: .starttls, username: "alice",
                                               password: "alice-pass", resource: "phone")
        try await befriend(alice, "alice@a.test", peerClient, peerJID)
        send(alice, to: peerJID, "hello from Starling")
        let there = try await nextMessage(peerClient, timeout: 20)
        XCTAssertEqual(there.child("body")?.text, "hello from Starling")
        XCTAssertEqual(there[attribute: "from"], "alice@a.test/phone")
        send(peerClient, to: "alice@a.test", "hello from the other side")
        let here = try await nextMessage(alice, timeout: 20)
        XCTAssertEqual(here.child("body")?.text, "hello from the other side")
        XCTAssertTrue(here[attribute: "from"]?.hasPrefix(peerJID) == true, here.serialized())
        // The peer's server answers an IQ for itself.
        let peerDomain = String(peerJID.split(separator: "@")[1])
        let version = try await alice.iq("<iq type='get' id='ver' to='\(peerDomain)'><query xmlns='jabber:iq:version'/></iq>", id: "ver", timeout: 20)
        XCTAssertEqual(version[attribute: "type"], "result", version.serialized())
        // Going offline there is seen here.
        peerClient.send("<presence type='unavailable'/>")
        let gone = try await alice.expect("\(peerJID) offline", timeout: 20) { $0.name == "presence" && $0[attribute: "type"] == "unavailable" }
        XCTAssertTrue(gone[attribute: "from"]?.hasPrefix(peerJID) == true, gone.serialized())
        let (status, streams) = try starling.ctl(["s2s-connections"])
        XCTAssertEqual(status, 0, streams)
        // Prosody agrees to XEP-0288 on our stream, but the stream it opened to check our dialback key is
        // authenticated by then, and it sends over that one.
        XCTAssertTrue(streams.contains("outgoing\(bidirectional ? "+bidi" : "") \(peerDomain) [a.test→\(peerDomain)] ready tls dialback"), streams)
        await alice.close()
    }

    func testProsody() async throws {
        let peer = try PeerServerDirectory(name: "prosody", domain: "prosody.test", hosts: ["a.test": starlingAddress, "prosody.test": prosodyAddress])
        let c2sPort = try ServerProcess.freePort()
        try """
        pidfile = "\(peer.path)/prosody.pid"
        data_path = "\(peer.path)/data"
        log = { info = "\(peer.path)/prosody.log" }
        c2s_ports = { \(c2sPort) }
        c2s_interfaces = { "\(prosodyAddress)" }
        s2s_ports = { 5269 }
        s2s_interfaces = { "\(prosodyAddress)" }
        http_ports = { }
        https_ports = { }
        c2s_require_encryption = false
        allow_unencrypted_plain_auth = true
        s2s_require_encryption = true
        s2s_secure_auth = false
        -- libunbound reads /etc/hosts only when told to (Prosody's default leaves it to DNS).
        unbound = { hoststxt = "/etc/hosts" }
        authentication = "internal_hashed"
        modules_enabled = { "roster"; "saslauth"; "tls"; "dialback"; "s2s_bidi"; "disco"; "ping"; "presence"; "version" }
        VirtualHost "prosody.test"
          ssl = { certificate = "\(peer.path)/cert.pem"; key = "\(peer.path)/key.pem" }
        """.write(toFile: "\(peer.path)/prosody.cfg.lua", atomically: true, encoding: .utf8)
        try peer.handOver(to: "prosody")
        let (registered, output) = try ServerProcess.run("/usr/bin/prosodyctl", ["--config", "\(peer.path)/prosody.cfg.lua", "register", "carol", "prosody.test", "carol-pass"])
        XCTAssertEqual(registered, 0, output)
        // As its own user, as Debian runs it (as root it will not load mod_posix, which handles SIGTERM).
        let prosody = try peer.launch("/usr/bin/setpriv", ["--reuid=prosody", "--regid=prosody", "--init-groups", "/usr/bin/prosody", "-F",
                                                           "--config", "\(peer.path)/prosody.cfg.lua"])
        defer {
            prosody.terminate()
            prosody.waitUntilExit()
        }
        try peer.waitUntilListening(prosodyAddress, c2sPort, log: "prosody.log")
        let starling = try startStarling(peer: "prosody.test", address: prosodyAddress)
        defer { _ = starling.stop() }
        let carol = try await TestClient.login(port: c2sPort, domain: "prosody.test", tls: .none, username: "carol", password: "carol-pass",
                                               mechanism: "PLAIN", resource: "laptop", host: prosodyAddress)
        try await exchange(starling: starling, peerClient: carol, peerJID: "carol@prosody.test", bidirectional: true)
        await carol.close()
    }

    func testEjabberd() async throws {
        let peer = try PeerServerDirectory(name: "ejabberd", domain: "ejabberd.test", hosts: ["a.test": starlingAddress, "ejabberd.test": ejabberdAddress])
        let c2sPort = try ServerProcess.freePort()
        try FileManager.default.createDirectory(atPath: "\(peer.path)/spool", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: "\(peer.path)/logs", withIntermediateDirectories: true)
        try """
        hosts: [ejabberd.test]
        loglevel: info
        certfiles: ["\(peer.path)/cert.pem", "\(peer.path)/key.pem"]
        s2s_use_starttls: required
        s2s_access: all
        auth_method: internal
        listen:
          - { port: \(c2sPort), ip: "\(ejabberdAddress)", module: ejabberd_c2s, starttls_required: false }
          - { port: 5269, ip: "\(ejabberdAddress)", module: ejabberd_s2s_in }
        acl:
          local: { user_regexp: "" }
        access_rules:
          local: { allow: local }
          c2s: { allow: all }
        modules:
          mod_roster: {}
          mod_disco: {}
          mod_ping: {}
          mod_version: {}
          mod_s2s_dialback: {}
        """.write(toFile: "\(peer.path)/ejabberd.yml", atomically: true, encoding: .utf8)
        // Erlang resolves through /etc/hosts first ("file"), then the system; Debian's inetrc says so.
        try "{lookup,[\"file\",\"native\"]}.\n{file, resolv, \"/etc/resolv.conf\"}.\n".write(toFile: "\(peer.path)/inetrc", atomically: true, encoding: .utf8)
        try "ERL_OPTIONS=\"-env ERL_CRASH_DUMP_BYTES 0\"\nEJABBERD_PID_PATH=\(peer.path)/ejabberd.pid\n"
            .write(toFile: "\(peer.path)/ejabberdctl.cfg", atomically: true, encoding: .utf8)
        try peer.handOver(to: "ejabberd")
        let node = "starlings2s\(UInt32.random(in: 0...UInt32.max))@localhost"
        let options = ["--config-dir", peer.path, "--config", "\(peer.path)/ejabberd.yml", "--ctl-config", "\(peer.path)/ejabberdctl.cfg",
                       "--logs", "\(peer.path)/logs", "--spool", "\(peer.path)/spool", "--node", node]
        // `start` leaves the node running behind it (the node inherits the namespace); then it is asked until it answers.
        _ = try peer.launch("/usr/sbin/ejabberdctl", options + ["start"])
        defer {
            _ = try? ServerProcess.run("/usr/sbin/ejabberdctl", options + ["stop"])
            _ = try? ServerProcess.run("/usr/sbin/ejabberdctl", options + ["stopped"])
        }
        var status: (Int32, String) = (1, "")
        for _ in 0..<120 where status.0 != 0 {
            try await Task.sleep(for: .milliseconds(500))
            status = try ServerProcess.run("/usr/sbin/ejabberdctl", options + ["status"])
        }
        XCTAssertEqual(status.0, 0, status.1)
        let (registered, output) = try ServerProcess.run("/usr/sbin/ejabberdctl", options + ["register", "dave", "ejabberd.test", "dave-pass"])
        XCTAssertEqual(registered, 0, output)
        try peer.waitUntilListening(ejabberdAddress, c2sPort, log: "logs/ejabberd.log")
        let starling = try startStarling(peer: "ejabberd.test", address: ejabberdAddress)
        defer { _ = starling.stop() }
        let dave = try await TestClient.login(port: c2sPort, domain: "ejabberd.test", tls: .none, username: "dave", password: "dave-pass",
                                              mechanism: "PLAIN", resource: "laptop", host: ejabberdAddress)
        try await exchange(starling: starling, peerClient: dave, peerJID: "dave@ejabberd.test", bidirectional: false)
        await dave.close()
    }
}

/// A peer server's directory: a self-signed certificate for its domain, and the /etc/hosts it sees.
private struct PeerServerDirectory {
    let path: String

    init(name: String, domain: String, hosts: [String: String]) throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-s2s-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: "\(path)/data", withIntermediateDirectories: true)
        let (status, output) = try ServerProcess.run("/usr/bin/openssl", [
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=\(domain)",
            "-addext", "subjectAltName=DNS:\(domain)", "-keyout", "\(path)/key.pem", "-out", "\(path)/cert.pem",
        ])
        XCTAssertEqual(status, 0, output)
        let lines = ["127.0.0.1 localhost"] + hosts.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }
        try (lines.joined(separator: "\n") + "\n").write(toFile: "\(path)/hosts", atomically: true, encoding: .utf8)
    }

    /// The server's own user must own its files.
    func handOver(to user: String) throws {
        let (status, output) = try ServerProcess.run("/bin/chown", ["-R", "\(user):", path])
        XCTAssertEqual(status, 0, output)
    }

    /// Runs `executable` in a mount namespace of its own where /etc/hosts is this directory's.
    func launch(_ executable: String, _ arguments: [String]) throws -> Process {
        let command = (["exec", executable] + arguments).map { "'\($0)'" }.joined(separator: " ")
        return try ServerProcess.startDaemon("/usr/bin/unshare", ["--mount", "--propagation", "private", "/bin/sh", "-c",
                                                                  "mount --bind '\(path)/hosts' /etc/hosts && \(command)"])
    }

    func waitUntilListening(_ host: String, _ port: Int, log: String) throws {
        for _ in 0..<400 {
            if acceptsConnections(port: port, host: host) { return }
            Thread.sleep(forTimeInterval: 0.05)
        }
        throw TestClientError.unexpected("the peer did not start: \((try? String(contentsOfFile: "\(path)/\(log)", encoding: .utf8)) ?? "(no log)")")
    }
}
