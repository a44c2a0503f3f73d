import Foundation
import StarlingTestClient
import XCTest

/// Starting with bad input and stopping gracefully, as an operator does.
final class LifecycleTests: XCTestCase {
    func testSIGTERMSaysSystemShutdownToEveryClientAndExitsCleanly() async throws {
        let server = try ServerProcess(users: [("erin", "erin-secret")])
        let bound = try await TestClient.login(port: server.starttlsPort, domain: "localhost", tls: .starttls, username: "erin", password: "erin-secret")
        let unauthenticated = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        try await unauthenticated.openStream()
        let (statusCode, status) = try server.ctl(["status"])
        XCTAssertEqual(statusCode, 0, status)
        XCTAssertTrue(status.contains("\"connections\":2"), status)
        XCTAssertTrue(status.contains("\"sessions\":1"), status)

        kill(server.process.processIdentifier, SIGTERM)
        let first = try await bound.expectStreamError()
        XCTAssertEqual(first, "system-shutdown")
        let second = try await unauthenticated.expectStreamError()
        XCTAssertEqual(second, "system-shutdown")
        XCTAssertEqual(server.stop(), 0, server.log)
        // What the closing session queued (presence, last activity) reached the store before it closed.
        XCTAssertFalse(server.log.contains("database is closed") || server.log.contains("storage failure"), server.log)
        let (code, output) = try server.ctl(["status"])
        XCTAssertNotEqual(code, 0)
        XCTAssertTrue(output.contains("not running"), output)
    }

    func testSilentClientIsDisconnectedAfterTheIdleTimeout() async throws {
        let server = try ServerProcess(extraConfig: "limits:\n  idle_timeout: 5\n  keepalive_interval: 1", users: [("gina", "gina-secret")])
        defer { server.stop() }
        let client = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "gina", password: "gina-secret")
        let started = Date()
        // First the server pings the silent client (XEP-0199); a client that answers stays.
        let ping = try await client.waitFor(timeout: 10, "a server ping") { event in
            if case .element(let e) = event { return e.child("ping", namespace: "urn:xmpp:ping") != nil }
            return false
        }
        guard case .element(let pingIQ) = ping else { return XCTFail() }
        XCTAssertEqual(pingIQ[attribute: "from"], "localhost")
        client.send(pingIQ.iqResult())
        let secondPing = try await client.waitFor(timeout: 10, "another ping") { event in
            if case .element(let e) = event { return e.child("ping", namespace: "urn:xmpp:ping") != nil }
            return false
        }
        XCTAssertNotNil(secondPing)
        // One that does not is disconnected.
        let condition = try await client.expectStreamError(timeout: 15)
        XCTAssertEqual(condition, "connection-timeout")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(started), 6, "the answered ping kept the session alive")
    }

    func testBadConfigFailsAtStartNamingFileLineAndKey() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-badconfig-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("starling.yml").path
        try "hosts: [localhost]\nlimits:\n  max_sessions_per_user: 0\n".write(toFile: path, atomically: true, encoding: .utf8)
        let (status, output) = try ServerProcess.run(ServerProcess.executable("starling"), ["--config", path])
        XCTAssertEqual(status, 78, output)
        XCTAssertTrue(output.contains("\(path):3: limits.max_sessions_per_user: 0 is out of range 1...1000"), output)
    }

    func testStarlingctlAccountCommands() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-ctl-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("starling.yml").path
        try "hosts: [example.org]\ndata_dir: data\n".write(toFile: path, atomically: true, encoding: .utf8)
        let ctl = ServerProcess.executable("starlingctl")
        XCTAssertEqual(try ServerProcess.run(ctl, ["register", "frank", "example.org", "-", "--config", path], stdin: "pw1\n").0, 0)
        let duplicate = try ServerProcess.run(ctl, ["register", "frank", "example.org", "pw", "--config", path])
        XCTAssertNotEqual(duplicate.0, 0)
        XCTAssertTrue(duplicate.1.contains("already exists"), duplicate.1)
        let wrongHost = try ServerProcess.run(ctl, ["register", "frank", "nowhere.org", "pw", "--config", path])
        XCTAssertTrue(wrongHost.1.contains("not a configured host"), wrongHost.1)
        XCTAssertEqual(try ServerProcess.run(ctl, ["change-password", "frank", "example.org", "pw2", "--config", path]).0, 0)
        XCTAssertEqual(try ServerProcess.run(ctl, ["unregister", "frank", "example.org", "--config", path]).0, 0)
        XCTAssertNotEqual(try ServerProcess.run(ctl, ["unregister", "frank", "example.org", "--config", path]).0, 0)
        // The database holds salted keys, never the password.
        let database = try Data(contentsOf: directory.appendingPathComponent("data/starling.sqlite"))
        XCTAssertNil(database.range(of: Data("pw2".utf8)))
    }
}

/// XEP-0227 export from one server and import into another: an operator moving between backends.
final class PortableDataTests: XCTestCase {
    func testExportThenImportCarriesAccountsAndTheirData() async throws {
        let source = try ServerProcess(users: [("ann", "ann-pw"), ("ben", "ben-pw")])
        let ann = try await TestClient.login(port: source.directTLSPort, domain: "localhost", tls: .direct, username: "ann", password: "ann-pw")
        ann.send("<iq type='set' id='r'><query xmlns='jabber:iq:roster'><item jid='ben@localhost' name='Ben'><group>Pals</group></item></query></iq>")
        ann.send("<iq type='set' id='v'><vCard xmlns='vcard-temp'><FN>Ann &amp; co</FN></vCard></iq>")
        ann.send("<iq type='set' id='b'><block xmlns='urn:xmpp:blocking'><item jid='spam@example.test'/></block></iq>")
        ann.send("<message to='ben@localhost' type='chat'><body>kept across servers</body></message>")
        _ = try await ann.waitFor("block ack") { if case .element(let e) = $0 { return e[attribute: "id"] == "b" }; return false }
        try await Task.sleep(for: .milliseconds(300))
        await ann.close()
        let exportPath = source.directory.appendingPathComponent("export.xml").path
        let (exported, exportOutput) = try source.ctl(["export", exportPath])
        XCTAssertEqual(exported, 0, exportOutput)
        let document = try String(contentsOfFile: exportPath, encoding: .utf8)
        XCTAssertTrue(document.contains("<scram-credentials"), "keys, not passwords, are exported")
        XCTAssertFalse(document.contains("ann-pw"))
        source.stop()

        // The target runs on the other backend when PostgreSQL is there, so both directions get exercised.
        let target = try ServerProcess(users: [("ben", "other-pw")], backend: ServerProcess.postgresURL == nil ? .sqlite : .postgresql)
        defer { target.stop() }
        let (imported, importOutput) = try target.ctl(["import", exportPath])
        XCTAssertEqual(imported, 0, importOutput)
        XCTAssertTrue(importOutput.contains("1 account(s)") && importOutput.contains("ben@localhost"), importOutput)

        let moved = try await TestClient.login(port: target.directTLSPort, domain: "localhost", tls: .direct, username: "ann", password: "ann-pw")
        moved.send("<iq type='get' id='r2'><query xmlns='jabber:iq:roster'/></iq>")
        let roster = try await moved.waitFor("roster") { if case .element(let e) = $0 { return e[attribute: "id"] == "r2" }; return false }
        guard case .element(let rosterIQ) = roster else { return XCTFail() }
        let item = rosterIQ.child("query")?.child("item")
        XCTAssertEqual(item?[attribute: "jid"], "ben@localhost")
        XCTAssertEqual(item?[attribute: "name"], "Ben")
        XCTAssertEqual(item?.child("group")?.text, "Pals")
        moved.send("<iq type='get' id='v2' to='ann@localhost'><vCard xmlns='vcard-temp'/></iq>")
        let vcard = try await moved.waitFor("vcard") { if case .element(let e) = $0 { return e[attribute: "id"] == "v2" }; return false }
        guard case .element(let vcardIQ) = vcard else { return XCTFail() }
        XCTAssertEqual(vcardIQ.child("vCard")?.child("FN")?.text, "Ann & co")
        moved.send("<iq type='get' id='b2'><blocklist xmlns='urn:xmpp:blocking'/></iq>")
        let blocklist = try await moved.waitFor("blocklist") { if case .element(let e) = $0 { return e[attribute: "id"] == "b2" }; return false }
        guard case .element(let blockIQ) = blocklist else { return XCTFail() }
        XCTAssertEqual(blockIQ.child("blocklist")?.child("item")?[attribute: "jid"], "spam@example.test")
        // The archive came along, under the same ids.
        let archive = try await MAM.query(moved)
        XCTAssertEqual(archive.bodies, ["kept across servers"])
        XCTAssertTrue(document.contains("<archive xmlns='urn:xmpp:pie:0#mam'><result xmlns='urn:xmpp:mam:2' id='\(archive.ids.first ?? "?")'>"), document)
        await moved.close()

        // Another server's archive: its ids are not ours, so new ones are made from the times, in order.
        let foreign = """
            <server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'><user name='cid' password='cid-pw'>
            <archive xmlns='urn:xmpp:pie:0#mam'>
            <result xmlns='urn:xmpp:mam:2' id='b7c3-1'><forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2020-05-01T10:00:00Z'/>
            <message xmlns='jabber:client' from='cid@localhost/a' to='dee@elsewhere.example' type='chat'><body>first</body></message></forwarded></result>
            <result xmlns='urn:xmpp:mam:2' id='a1f0-2'><forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2020-05-01T10:00:00Z'/>
            <message xmlns='jabber:client' from='dee@elsewhere.example/b' to='cid@localhost' type='chat'><body>second</body></message></forwarded></result>
            </archive></user></host></server-data>
            """
        let foreignPath = target.directory.appendingPathComponent("foreign.xml").path
        try foreign.write(toFile: foreignPath, atomically: true, encoding: .utf8)
        let (foreignStatus, foreignOutput) = try target.ctl(["import", foreignPath])
        XCTAssertEqual(foreignStatus, 0, foreignOutput)
        let cid = try await TestClient.login(port: target.directTLSPort, domain: "localhost", tls: .direct, username: "cid", password: "cid-pw")
        let cidArchive = try await MAM.query(cid, fields: ["with": ["dee@elsewhere.example"]])
        XCTAssertEqual(cidArchive.bodies, ["first", "second"])
        let old = try await MAM.query(cid, fields: ["end": ["2020-05-02T00:00:00Z"]])
        XCTAssertEqual(old.messages.count, 2, "the imported times are kept")
        // An operator purges what is older than a date: one account's, or everyone's.
        let (purged, purgeOutput) = try target.ctl(["purge-archives", "--before", "2021-01-01T00:00:00Z", "--user", "cid@localhost"])
        XCTAssertEqual(purged, 0, purgeOutput)
        XCTAssertTrue(purgeOutput.contains("deleted 2 archived message(s)"), purgeOutput)
        let (badDate, badDateOutput) = try target.ctl(["purge-archives", "--before", "last week"])
        XCTAssertNotEqual(badDate, 0)
        XCTAssertTrue(badDateOutput.contains("not a XEP-0082 date-time"), badDateOutput)
        let purgedArchive = try await MAM.query(cid)
        XCTAssertEqual(purgedArchive.messages.count, 0)
        await cid.close()
        // ben already existed on the target and was left alone: his password there still works.
        let ben = try await TestClient.login(port: target.directTLSPort, domain: "localhost", tls: .direct, username: "ben", password: "other-pw")
        await ben.close()
    }
}
