import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Moving from ejabberd and Prosody: a real ejabberd's `export_piefxis` (plain and SCRAM password storage)
/// and a real Prosody's data folder, with accounts, rosters, vCards, private XML and offline messages
/// created through XMPP, imported with starlingctl; the users then log in to Starling with their old
/// passwords and find their data.
final class ImportTests: XCTestCase {
    static let tools = ["/usr/sbin/ejabberdctl", "/usr/bin/prosodyctl", "/usr/bin/prosody", "/usr/bin/setpriv"]

    func requireTools() throws {
        for tool in Self.tools where !FileManager.default.isExecutableFile(atPath: tool) {
            throw XCTSkip("\(tool) is missing: scripts/bootstrap installs Debian's ejabberd and prosody")
        }
        guard getuid() == 0 else { throw XCTSkip("ejabberdctl runs a private node only as root (it switches to the ejabberd user)") }
    }

    /// A private ejabberd node on loopback: localhost keeps passwords in the clear, example.test as SCRAM.
    final class Ejabberd {
        let directory: URL
        let port: Int
        let node = "starlingtest\(UInt32.random(in: 0...UInt32.max))@localhost"

        init() throws {
            directory = FileManager.default.temporaryDirectory.appendingPathComponent("ejabberd-\(UUID().uuidString)")
            port = try ServerProcess.freePort()
            for folder in ["spool", "logs", "export"] {
                try FileManager.default.createDirectory(at: directory.appendingPathComponent(folder), withIntermediateDirectories: true)
            }
            try """
            hosts: [localhost, example.test]
            loglevel: warning
            certfiles: []
            auth_method: internal
            auth_password_format: plain
            host_config:
              example.test:
                auth_password_format: scram
            listen:
              - { port: \(port), ip: "127.0.0.1", module: ejabberd_c2s, starttls_required: false }
            acl:
              local: { user_regexp: "" }
            access_rules:
              local: { allow: local }
              c2s: { allow: all }
            modules:
              mod_roster: {}
              mod_vcard: {}
              mod_offline: {}
              mod_private: {}
              mod_disco: {}
              mod_blocking: {}
              mod_privacy: {}
            """.write(to: directory.appendingPathComponent("ejabberd.yml"), atomically: true, encoding: .utf8)
            try "ERL_OPTIONS=\"-env ERL_CRASH_DUMP_BYTES 0\"\nEJABBERD_PID_PATH=\(directory.path)/ejabberd.pid\n"
                .write(to: directory.appendingPathComponent("ejabberdctl.cfg"), atomically: true, encoding: .utf8)
            try? FileManager.default.copyItem(atPath: "/etc/ejabberd/inetrc", toPath: directory.appendingPathComponent("inetrc").path)
            // ejabberdctl switches to the ejabberd user, who must own the node's files.
            let (chown, output) = try ServerProcess.run("/bin/chown", ["-R", "ejabberd:", directory.path])
            XCTAssertEqual(chown, 0, output)
            // `start` leaves the node running behind it: launched like pg_ctl (not waited for), then the node is
            // asked until it answers.
            _ = try ServerProcess.startDaemon("/usr/sbin/ejabberdctl", options + ["start"])
            var status: (Int32, String) = (1, "")
            for _ in 0..<120 {
                Thread.sleep(forTimeInterval: 0.5)
                status = try ctl(["status"])
                if status.0 == 0 { break }
            }
            XCTAssertEqual(status.0, 0, status.1)
            let (waited, waitOutput) = try ctl(["started"])
            XCTAssertEqual(waited, 0, waitOutput)
        }

        var options: [String] {
            ["--config-dir", directory.path, "--config", directory.appendingPathComponent("ejabberd.yml").path,
             "--ctl-config", directory.appendingPathComponent("ejabberdctl.cfg").path, "--logs", directory.appendingPathComponent("logs").path,
             "--spool", directory.appendingPathComponent("spool").path, "--node", node]
        }

        func ctl(_ arguments: [String]) throws -> (Int32, String) {
            try ServerProcess.run("/usr/sbin/ejabberdctl", options + arguments)
        }

        func stop() {
            _ = try? ctl(["stop"])
            _ = try? ctl(["stopped"])
            try? FileManager.default.removeItem(at: directory)
        }
    }

    /// A private Prosody on loopback serving example.test, with its internal storage in `data`; vCards go
    /// through mod_vcard_legacy into PEP (XEP-0292), as in Debian's default configuration.
    final class Prosody {
        let directory: URL
        let port: Int
        let process = Process()

        init() throws {
            directory = FileManager.default.temporaryDirectory.appendingPathComponent("prosody-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: directory.appendingPathComponent("data"), withIntermediateDirectories: true)
            port = try ServerProcess.freePort()
            try """
            pidfile = "\(directory.path)/prosody.pid"
            data_path = "\(directory.path)/data"
            log = { warn = "\(directory.path)/prosody.log" }
            c2s_ports = { \(port) }
            c2s_interfaces = { "127.0.0.1" }
            s2s_ports = { }
            http_ports = { }
            https_ports = { }
            c2s_require_encryption = false
            allow_unencrypted_plain_auth = true
            authentication = "internal_hashed"
            storage = "internal"
            modules_enabled = { "roster"; "saslauth"; "disco"; "vcard_legacy"; "private"; "blocklist"; "offline"; "ping"; "mam" }
            modules_disabled = { "s2s" }
            daemonize = false
            VirtualHost "example.test"
            """.write(to: configPath, atomically: true, encoding: .utf8)
            _ = try ServerProcess.run("/bin/chown", ["-R", "prosody:", directory.path])
        }

        var configPath: URL { directory.appendingPathComponent("prosody.cfg.lua") }
        var dataPath: String { directory.appendingPathComponent("data").path }

        func register(_ user: String, _ password: String) throws {
            let (status, output) = try ServerProcess.run("/usr/bin/prosodyctl", ["--config", configPath.path, "register", user, "example.test", password])
            XCTAssertEqual(status, 0, output)
        }

        func start() throws {
            // As its own user, as Debian runs it: as root it refuses to load mod_posix, which handles SIGTERM.
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            process.arguments = ["--reuid=prosody", "--regid=prosody", "--init-groups", "/usr/bin/prosody", "--config", configPath.path]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            // Ready once it accepts connections.
            for _ in 0..<200 {
                if acceptsConnections(port: port) { return }
                Thread.sleep(forTimeInterval: 0.05)
            }
            XCTFail("prosody did not start: \((try? String(contentsOf: directory.appendingPathComponent("prosody.log"), encoding: .utf8)) ?? "")")
        }

        func stop() {
            guard process.isRunning else { return }
            process.terminate()
            for _ in 0..<200 where process.isRunning { Thread.sleep(forTimeInterval: 0.05) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
    }

    /// `presence: false` for a login that only checks the password: initial presence would take the offline messages.
    func login(_ port: Int, _ domain: String, _ user: String, _ password: String, mechanism: String = "PLAIN", tls: TestClient.TLSMode = .none,
               presence: Bool = true) async throws -> TestClient {
        try await TestClient.login(port: port, domain: domain, tls: tls, username: user, password: password, mechanism: mechanism, resource: "r",
                                   presence: presence)
    }

    /// What alice does on the old server: a contact in a group, a vCard, a bookmark in private storage.
    func populate(_ alice: TestClient, contact: String) async throws {
        var reply = try await alice.iq("<iq type='set' id='roster1'><query xmlns='jabber:iq:roster'><item jid='\(contact)' name='Bob'><group>Friends</group></item></query></iq>", id: "roster1")
        XCTAssertEqual(reply[attribute: "type"], "result", reply.serialized())
        reply = try await alice.iq("<iq type='set' id='vc1'><vCard xmlns='vcard-temp'><FN>Alice Liddell</FN></vCard></iq>", id: "vc1")
        XCTAssertEqual(reply[attribute: "type"], "result", reply.serialized())
        reply = try await alice.iq("<iq type='set' id='pr1'><query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'><conference jid='tea@conference.example.test' name='Tea'/></storage></query></iq>", id: "pr1")
        XCTAssertEqual(reply[attribute: "type"], "result", reply.serialized())
    }

    /// What alice finds on Starling.
    func checkAlice(_ alice: TestClient, contact: String) async throws {
        let roster = try await alice.iq("<iq type='get' id='r2'><query xmlns='jabber:iq:roster'/></iq>", id: "r2")
        let item = roster.child("query")?.elements.first { $0[attribute: "jid"] == contact }
        XCTAssertEqual(item?[attribute: "name"], "Bob", roster.serialized())
        XCTAssertEqual(item?.child("group")?.text, "Friends", roster.serialized())
        let vCard = try await alice.iq("<iq type='get' id='v2'><vCard xmlns='vcard-temp'/></iq>", id: "v2")
        XCTAssertEqual(vCard.child("vCard")?.child("FN")?.text, "Alice Liddell", vCard.serialized())
        let bookmarks = try await alice.iq("<iq type='get' id='p2'><query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'/></query></iq>", id: "p2")
        XCTAssertEqual(bookmarks.child("query")?.child("storage")?.child("conference")?[attribute: "name"], "Tea", bookmarks.serialized())
    }

    func testEjabberdExportWithPlainAndSCRAMPasswords() async throws {
        try requireTools()
        let ejabberd = try Ejabberd()
        defer { ejabberd.stop() }
        for (user, host, password) in [("alice", "localhost", "alicepw"), ("bob", "localhost", "bobpw"), ("carol", "example.test", "carolpw")] {
            let (status, output) = try ejabberd.ctl(["register", user, host, password])
            XCTAssertEqual(status, 0, output)
        }
        let alice = try await login(ejabberd.port, "localhost", "alice", "alicepw")
        try await populate(alice, contact: "bob@localhost")
        await alice.close()
        let bob = try await login(ejabberd.port, "localhost", "bob", "bobpw")
        bob.send("<message to='carol@example.test' type='chat' id='m1'><body>written while carol was away</body></message>")
        _ = try await bob.iq("<iq type='get' id='sync' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "sync")
        await bob.close()
        let exportFolder = ejabberd.directory.appendingPathComponent("export")
        let (exported, exportOutput) = try ejabberd.ctl(["export_piefxis", exportFolder.path])
        XCTAssertEqual(exported, 0, exportOutput)
        let files = try FileManager.default.contentsOfDirectory(atPath: exportFolder.path).sorted()
        let main = try XCTUnwrap(files.first { !$0.contains("_") }, "\(files)")
        let scramHostFile = try XCTUnwrap(files.first { $0.hasSuffix("_example_test.xml") }, "\(files)")

        let server = try ServerProcess(users: [])
        XCTAssertEqual(server.stop(), 0)
        let mainPath = exportFolder.appendingPathComponent(main).path
        var (status, output) = try server.ctl(["import", "--dry-run", mainPath])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("would import 3 account(s): 1 roster item(s)"), output)
        XCTAssertTrue(output.contains("1 vCard(s), 1 offline message(s), 1 private document(s)"), output)
        (status, output) = try server.ctl(["import", mainPath])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("imported 3 account(s)"), output)
        // Again: nothing twice.
        (status, output) = try server.ctl(["import", mainPath])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("imported 0 account(s)") && output.contains("carol@example.test: already present"), output)
        // One host's file alone, replacing what is there.
        (status, output) = try server.ctl(["import", "--replace", exportFolder.appendingPathComponent(scramHostFile).path])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("imported 1 account(s)"), output)

        let restarted = try ServerProcess(restarting: server)
        defer { XCTAssertEqual(restarted.stop(), 0) }
        // A password ejabberd kept in the clear now logs in with every mechanism.
        for mechanism in ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"] {
            let client = try await login(restarted.directTLSPort, "localhost", "alice", "alicepw", mechanism: mechanism, tls: .direct)
            if mechanism == "PLAIN" { try await checkAlice(client, contact: "bob@localhost") }
            await client.close()
        }
        // ejabberd's SCRAM-SHA-1 keys, kept as they were (salt and iteration count too).
        for mechanism in ["SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "PLAIN"] {
            let client = try await login(restarted.directTLSPort, "example.test", "carol", "carolpw", mechanism: mechanism, tls: .direct, presence: false)
            await client.close()
        }
        // The PLAIN login had the password at hand and added SCRAM-SHA-256 keys.
        let upgraded = try await login(restarted.directTLSPort, "example.test", "carol", "carolpw", mechanism: "SCRAM-SHA-256", tls: .direct, presence: false)
        await upgraded.close()
        do {
            _ = try await login(restarted.directTLSPort, "example.test", "carol", "wrong", mechanism: "SCRAM-SHA-1", tls: .direct, presence: false)
            XCTFail("a wrong password logged in")
        } catch {}
        let carol = try await login(restarted.directTLSPort, "example.test", "carol", "carolpw", mechanism: "SCRAM-SHA-1", tls: .direct)
        let offline = try await carol.expect("the offline message") { $0.name == "message" }
        XCTAssertEqual(offline.child("body")?.text, "written while carol was away")
        XCTAssertEqual(offline[attribute: "from"]?.hasPrefix("bob@localhost"), true)
        await carol.close()
    }

    func testProsodyDataFolder() async throws {
        try requireTools()
        let prosody = try Prosody()
        defer { prosody.stop(); try? FileManager.default.removeItem(at: prosody.directory) }
        for (user, password) in [("alice", "alicepw"), ("bob", "bobpw"), ("carol", "carolpw")] { try prosody.register(user, password) }
        try prosody.start()
        let alice = try await login(prosody.port, "example.test", "alice", "alicepw")
        try await populate(alice, contact: "bob@example.test")
        let blocked = try await alice.iq("<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='spammer@example.org'/></block></iq>", id: "b1")
        XCTAssertEqual(blocked[attribute: "type"], "result", blocked.serialized())
        await alice.close()
        let bob = try await login(prosody.port, "example.test", "bob", "bobpw")
        bob.send("<presence to='alice@example.test' type='subscribe'/>")
        bob.send("<message to='carol@example.test' type='chat' id='m1'><body>written while carol was away</body></message>")
        _ = try await bob.iq("<iq type='get' id='sync' to='example.test'><ping xmlns='urn:xmpp:ping'/></iq>", id: "sync")
        await bob.close()
        prosody.stop()

        let server = try ServerProcess(users: [])
        XCTAssertEqual(server.stop(), 0)
        let (status, output) = try server.ctl(["import-prosody", prosody.dataPath])
        XCTAssertEqual(status, 0, output)
        // Roster items: alice's bob, and bob's alice (asked); archives: the message in bob's and in carol's.
        XCTAssertTrue(output.contains("imported 3 account(s): 2 roster item(s), 1 pending subscription(s), 1 vCard(s), 1 offline message(s), 1 private document(s), 1 blocked JID(s), 2 archived message(s)"), output)
        let restarted = try ServerProcess(restarting: server)
        defer { XCTAssertEqual(restarted.stop(), 0) }
        // Prosody's SCRAM-SHA-1 keys, hex, with its salt and 10,000 iterations.
        for mechanism in ["SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "PLAIN"] {
            let client = try await login(restarted.directTLSPort, "example.test", "alice", "alicepw", mechanism: mechanism, tls: .direct)
            if mechanism == "PLAIN" {
                try await checkAlice(client, contact: "bob@example.test")
                let list = try await client.iq("<iq type='get' id='b2'><blocklist xmlns='urn:xmpp:blocking'/></iq>", id: "b2")
                XCTAssertEqual(list.child("blocklist")?.child("item")?[attribute: "jid"], "spammer@example.org", list.serialized())
                // bob's request, unanswered on Prosody, is waiting here too.
                let request = try await client.expect("bob's subscription request") { $0.name == "presence" && $0[attribute: "type"] == "subscribe" }
                XCTAssertEqual(request[attribute: "from"], "bob@example.test")
            }
            await client.close()
        }
        let carol = try await login(restarted.directTLSPort, "example.test", "carol", "carolpw", mechanism: "SCRAM-SHA-1", tls: .direct)
        let offline = try await carol.expect("the offline message") { $0.name == "message" }
        XCTAssertEqual(offline.child("body")?.text, "written while carol was away")
        XCTAssertNotNil(offline.child("delay", namespace: "urn:xmpp:delay"), offline.serialized())
        let archive = try await MAM.query(carol)
        XCTAssertEqual(archive.messages.compactMap { $0.child("body")?.text }, ["written while carol was away"])
        await carol.close()
    }
}
