import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Transcript-style tests of the IM modules (roster, presence, disco, version, time) on the real server.
final class IMIntegrationTests: XCTestCase {
    static let users = (1...16).map { ("user\($0)", "pass\($0)") }
    nonisolated(unsafe) static var server: ServerProcess!

    override class func setUp() {
        super.setUp()
        do { server = try ServerProcess(users: users) } catch {
            startFailure = error
        }
    }

    nonisolated(unsafe) static var startFailure: (any Error)?

    override func setUpWithError() throws {
        if let failure = Self.startFailure { throw failure }
    }

    override class func tearDown() {
        startFailure = nil
        XCTAssertEqual(server?.stop() ?? 0, 0)
        server = nil
        super.tearDown()
    }

    private func login(_ number: Int, resource: String? = nil, presence: Bool = false) async throws -> TestClient {
        try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct,
                                   username: "user\(number)", password: "pass\(number)", resource: resource, presence: presence)
    }

    private func iq(_ client: TestClient, _ xml: String, id: String) async throws -> XMLElement {
        client.send(xml)
        let event = try await client.waitFor("iq \(id)") { event in
            if case .element(let e) = event, e.name == "iq", e[attribute: "id"] == id, e[attribute: "type"] == "result" || e[attribute: "type"] == "error" { return true }
            return false
        }
        guard case .element(let reply) = event else { throw TestClientError.unexpected("\(event)") }
        return reply
    }

    private func errorCondition(_ stanza: XMLElement) -> String? {
        stanza.child("error")?.elements.first { $0.namespace == Namespace.stanzaErrors }?.name
    }

    private func expect(_ client: TestClient, _ description: String, where matches: @escaping (XMLElement) -> Bool) async throws -> XMLElement {
        let event = try await client.waitFor(description) { event in
            if case .element(let e) = event { return matches(e) }
            return false
        }
        guard case .element(let element) = event else { throw TestClientError.unexpected("\(event)") }
        return element
    }

    private func rosterPush(_ client: TestClient, contact: String) async throws -> XMLElement {
        let push = try await expect(client, "roster push for \(contact)") {
            $0.name == "iq" && $0[attribute: "type"] == "set" && $0.child("query", namespace: "jabber:iq:roster")?.child("item")?[attribute: "jid"] == contact
        }
        return push.child("query")!.child("item")!
    }

    private func presence(_ client: TestClient, from: String, type: String?) async throws -> XMLElement {
        try await expect(client, "presence \(type ?? "available") from \(from)") {
            $0.name == "presence" && ($0[attribute: "from"] ?? "").hasPrefix(from) && $0[attribute: "type"] == type
        }
    }

    private func fetchRoster(_ client: TestClient, id: String, version: String? = nil) async throws -> XMLElement {
        let ver = version.map { " ver='\($0)'" } ?? ""
        return try await iq(client, "<iq type='get' id='\(id)'><query xmlns='jabber:iq:roster'\(ver)/></iq>", id: id)
    }

    // MARK: Roster

    func testRosterSetGetVersioningAndErrors() async throws {
        let user = try await login(1)
        let empty = try await fetchRoster(user, id: "r1")
        XCTAssertEqual(empty.child("query")?.elements.count, 0)
        let set = try await iq(user, "<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='user2@localhost' name='Two'><group>Friends</group><group>Work</group></item></query></iq>", id: "s1")
        XCTAssertEqual(set[attribute: "type"], "result")
        let pushed = try await rosterPush(user, contact: "user2@localhost")
        XCTAssertEqual(pushed[attribute: "name"], "Two")
        XCTAssertEqual(pushed[attribute: "subscription"], "none")
        XCTAssertEqual(pushed.elements.map(\.text), ["Friends", "Work"])

        let roster = try await fetchRoster(user, id: "r2")
        let version = try XCTUnwrap(roster.child("query")?[attribute: "ver"])
        XCTAssertEqual(roster.child("query")?.elements.map { $0[attribute: "jid"] }, ["user2@localhost"])
        let unchanged = try await fetchRoster(user, id: "r3", version: version)
        XCTAssertNil(unchanged.child("query"), "an up-to-date version gets an empty result (XEP-0237)")
        let stale = try await fetchRoster(user, id: "r4", version: "0")
        XCTAssertEqual(stale.child("query")?.elements.count, 1)

        let twoItems = try await iq(user, "<iq type='set' id='e1'><query xmlns='jabber:iq:roster'><item jid='a@localhost'/><item jid='b@localhost'/></query></iq>", id: "e1")
        XCTAssertEqual(errorCondition(twoItems), "bad-request")
        let badSubscription = try await iq(user, "<iq type='set' id='e2'><query xmlns='jabber:iq:roster'><item jid='a@localhost' subscription='both'/></query></iq>", id: "e2")
        XCTAssertEqual(errorCondition(badSubscription), "bad-request")
        let duplicateGroups = try await iq(user, "<iq type='set' id='e3'><query xmlns='jabber:iq:roster'><item jid='a@localhost'><group>x</group><group>x</group></item></query></iq>", id: "e3")
        XCTAssertEqual(errorCondition(duplicateGroups), "bad-request")
        let missing = try await iq(user, "<iq type='set' id='e4'><query xmlns='jabber:iq:roster'><item jid='nobody@localhost' subscription='remove'/></query></iq>", id: "e4")
        XCTAssertEqual(errorCondition(missing), "item-not-found")
        let foreign = try await iq(user, "<iq type='get' id='e5' to='user3@localhost'><query xmlns='jabber:iq:roster'/></iq>", id: "e5")
        XCTAssertEqual(errorCondition(foreign), "forbidden")

        let removed = try await iq(user, "<iq type='set' id='s2'><query xmlns='jabber:iq:roster'><item jid='user2@localhost' subscription='remove'/></query></iq>", id: "s2")
        XCTAssertEqual(removed[attribute: "type"], "result")
        let removal = try await rosterPush(user, contact: "user2@localhost")
        XCTAssertEqual(removal[attribute: "subscription"], "remove")
        await user.close()
    }

    // MARK: Subscriptions and presence

    func testMutualSubscriptionPresenceAndUnavailableOnDisconnect() async throws {
        let a = try await login(3, resource: "a")
        let b = try await login(4, resource: "b")
        _ = try await fetchRoster(a, id: "ra")
        _ = try await fetchRoster(b, id: "rb")
        a.send("<presence/>")
        b.send("<presence><show>away</show></presence>")
        try await Task.sleep(for: .milliseconds(200))

        a.send("<presence to='user4@localhost' type='subscribe'/>")
        let asking = try await rosterPush(a, contact: "user4@localhost")
        XCTAssertEqual(asking[attribute: "ask"], "subscribe")
        let request = try await presence(b, from: "user3@localhost", type: "subscribe")
        XCTAssertEqual(request[attribute: "from"], "user3@localhost", "subscription requests come from the bare JID")

        b.send("<presence to='user3@localhost' type='subscribed'/>")
        let bSide = try await rosterPush(b, contact: "user3@localhost")
        XCTAssertEqual(bSide[attribute: "subscription"], "from")
        let aSide = try await rosterPush(a, contact: "user4@localhost")
        XCTAssertEqual(aSide[attribute: "subscription"], "to")
        XCTAssertNil(aSide[attribute: "ask"])
        _ = try await presence(a, from: "user4@localhost", type: "subscribed")
        let bPresence = try await presence(a, from: "user4@localhost/b", type: nil)
        XCTAssertEqual(bPresence.child("show")?.text, "away", "the approver's current presence follows")

        // And the other way round.
        b.send("<presence to='user3@localhost' type='subscribe'/>")
        _ = try await presence(a, from: "user4@localhost", type: "subscribe")
        a.send("<presence to='user4@localhost' type='subscribed'/>")
        let both = try await expect(b, "b's item becomes both") {
            $0.name == "iq" && $0.child("query")?.child("item")?[attribute: "subscription"] == "both"
        }
        XCTAssertEqual(both.child("query")?.child("item")?[attribute: "jid"], "user3@localhost")
        _ = try await presence(b, from: "user3@localhost/a", type: nil)

        // A presence change is broadcast to subscribers.
        a.send("<presence><status>reading</status><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://example.org/client' ver='QgayPKawpkPSDYmwT/WM94uAlu0='/></presence>")
        let update = try await presence(b, from: "user3@localhost/a", type: nil)
        XCTAssertEqual(update.child("status")?.text, "reading")
        XCTAssertEqual(update.child("c", namespace: "http://jabber.org/protocol/caps")?[attribute: "ver"], "QgayPKawpkPSDYmwT/WM94uAlu0=", "entity caps pass through (XEP-0115)")

        // A vanished session is announced as unavailable.
        try await a.channel.close()
        _ = try await presence(b, from: "user3@localhost/a", type: "unavailable")

        // Logging in again: initial presence brings probes answered with the contact's presence.
        let again = try await login(3, resource: "again", presence: false)
        again.send("<presence/>")
        let probed = try await presence(again, from: "user4@localhost/b", type: nil)
        XCTAssertEqual(probed.child("show")?.text, "away")
        _ = try await presence(b, from: "user3@localhost/again", type: nil)
        await again.close()
        await b.close()
    }

    func testPreApprovalAndPendingRequestsWhileOffline() async throws {
        let carol = try await login(5, resource: "c", presence: true)
        _ = try await fetchRoster(carol, id: "rc")
        // Pre-approve user6 before they ask: stored, not delivered.
        carol.send("<presence to='user6@localhost' type='subscribed'/>")
        _ = try await rosterPush(carol, contact: "user6@localhost")

        let dave = try await login(6, resource: "d", presence: true)
        _ = try await fetchRoster(dave, id: "rd")
        dave.send("<presence to='user5@localhost' type='subscribe'/>")
        _ = try await presence(dave, from: "user5@localhost", type: "subscribed")
        _ = try await presence(dave, from: "user5@localhost/c", type: nil)
        let carolSide = try await expect(carol, "carol's item becomes from") {
            $0.name == "iq" && $0.child("query")?.child("item")?[attribute: "subscription"] == "from"
        }
        XCTAssertEqual(carolSide.child("query")?.child("item")?[attribute: "jid"], "user6@localhost")

        // A request to someone offline waits and is shown at their next initial presence.
        dave.send("<presence to='user7@localhost' type='subscribe'/>")
        try await Task.sleep(for: .milliseconds(200))
        let erin = try await login(7, presence: false)
        erin.send("<presence/>")
        let pending = try await presence(erin, from: "user6@localhost", type: "subscribe")
        XCTAssertEqual(pending[attribute: "from"], "user6@localhost")
        erin.send("<presence to='user6@localhost' type='unsubscribed'/>")
        _ = try await presence(dave, from: "user7@localhost", type: "unsubscribed")
        for client in [carol, dave, erin] { await client.close() }
    }

    func testRemovingAContactCancelsBothDirections() async throws {
        let a = try await login(8, resource: "a", presence: true)
        let b = try await login(9, resource: "b", presence: true)
        _ = try await fetchRoster(a, id: "ra")
        _ = try await fetchRoster(b, id: "rb")
        a.send("<presence to='user9@localhost' type='subscribe'/>")
        _ = try await presence(b, from: "user8@localhost", type: "subscribe")
        b.send("<presence to='user8@localhost' type='subscribed'/>")
        _ = try await presence(a, from: "user9@localhost/b", type: nil)

        _ = try await iq(a, "<iq type='set' id='rm'><query xmlns='jabber:iq:roster'><item jid='user9@localhost' subscription='remove'/></query></iq>", id: "rm")
        _ = try await presence(b, from: "user8@localhost", type: "unsubscribe")
        let bItem = try await expect(b, "b's item drops to none") {
            $0.name == "iq" && $0.child("query")?.child("item")?[attribute: "subscription"] == "none"
        }
        XCTAssertEqual(bItem.child("query")?.child("item")?[attribute: "jid"], "user8@localhost")
        await a.close()
        await b.close()
    }

    func testSlixmppSubscriptionsRosterAndOfflineDelivery() throws {
        let (status, output) = try ServerProcess.slixmpp([
            "im", "--port", "\(Self.server.starttlsPort)", "--tls", "starttls",
            "--jid-a", "user12@localhost", "--password-a", "pass12", "--jid-b", "user13@localhost", "--password-b", "pass13",
            "--jid-c", "user14@localhost", "--password-c", "pass14",
        ])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("OK"), output)
    }

    // MARK: Disco and simple modules

    func testDiscoVersionAndTime() async throws {
        let user = try await login(10)
        let info = try await iq(user, "<iq type='get' id='d1' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "d1")
        let features = Set(info.child("query")?.elements.filter { $0.name == "feature" }.compactMap { $0[attribute: "var"] } ?? [])
        XCTAssertEqual(features, ["http://jabber.org/protocol/disco#info", "http://jabber.org/protocol/disco#items", "urn:xmpp:ping",
                                  "jabber:iq:version", "urn:xmpp:time", "urn:xmpp:features:rosterver", "urn:xmpp:features:pre-approval",
                                  "msgoffline", "urn:xmpp:blocking", "jabber:iq:privacy", "vcard-temp", "jabber:iq:last", "urn:xmpp:carbons:2",
                                  "jabber:iq:register"])
        XCTAssertEqual(info.child("query")?.child("identity")?[attribute: "category"], "server")

        let account = try await iq(user, "<iq type='get' id='d2' to='user10@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "d2")
        XCTAssertEqual(account.child("query")?.child("identity")?[attribute: "type"], "registered")
        // Others learn only what the server does for every account (PEP), whether or not it exists.
        for (id, target) in [("d3", "user11@localhost"), ("d4", "nobody@localhost")] {
            let other = try await iq(user, "<iq type='get' id='\(id)' to='\(target)'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: id)
            let identities = other.child("query")?.elements.filter { $0.name == "identity" }.map { "\($0[attribute: "category"] ?? "")/\($0[attribute: "type"] ?? "")" }
            XCTAssertEqual(identities, ["pubsub/pep"], other.serialized())
        }

        let version = try await iq(user, "<iq type='get' id='v1' to='localhost'><query xmlns='jabber:iq:version'/></iq>", id: "v1")
        XCTAssertEqual(version.child("query")?.child("name")?.text, "Starling")
        XCTAssertNil(version.child("query")?.child("os"), "the OS is not disclosed by default")
        let time = try await iq(user, "<iq type='get' id='t1' to='localhost'><time xmlns='urn:xmpp:time'/></iq>", id: "t1")
        let utc = try XCTUnwrap(time.child("time")?.child("utc")?.text)
        XCTAssertNotNil(ISO8601DateFormatter().date(from: String(utc.prefix(19)) + "Z"), utc)
        await user.close()
    }

    func testDisabledModulesLoseTheirFeaturesAndHandlers() async throws {
        // Modules are per host: example.test keeps the full set while localhost gets two.
        let minimal = try ServerProcess(extraConfig: "host_modules:\n  localhost:\n    disco: {}\n    ping: {}", users: [("solo", "solo-pass")])
        defer { minimal.stop() }
        let client = try await TestClient.login(port: minimal.directTLSPort, domain: "localhost", tls: .direct, username: "solo", password: "solo-pass")
        let info = try await iq(client, "<iq type='get' id='d1' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "d1")
        let features = Set(info.child("query")?.elements.filter { $0.name == "feature" }.compactMap { $0[attribute: "var"] } ?? [])
        XCTAssertEqual(features, ["http://jabber.org/protocol/disco#info", "http://jabber.org/protocol/disco#items", "urn:xmpp:ping"])
        let version = try await iq(client, "<iq type='get' id='v1' to='localhost'><query xmlns='jabber:iq:version'/></iq>", id: "v1")
        XCTAssertEqual(errorCondition(version), "service-unavailable")
        let roster = try await iq(client, "<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>", id: "r1")
        XCTAssertEqual(errorCondition(roster), "service-unavailable")
        let other = try await iq(client, "<iq type='get' id='v2' to='example.test'><query xmlns='jabber:iq:version'/></iq>", id: "v2")
        XCTAssertEqual(other.child("query")?.child("name")?.text, "Starling", "the other host keeps its modules")
        await client.close()
    }

    func testUnknownModuleOrBadOptionFailsAtStart() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-modcfg-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("starling.yml").path
        for (yaml, expected) in [
            ("modules:\n  disco: {}\n  telepathy: {}\n", "\(path):3: modules.telepathy: unknown module"),
            ("modules:\n  roster:\n    max_items: 0\n", "\(path):3: modules.roster.max_items: 0 is out of range"),
            ("modules:\n  version:\n    show_oss: true\n", "\(path):3: modules.version.show_oss: unknown option (did you mean 'show_os'?)"),
            ("modules:\n  presence: {}\n", "\(path):2: modules.presence: needs module 'roster'"),
            ("host_modules:\n  elsewhere.org:\n    ping: {}\n", "\(path):2: host_modules.elsewhere.org: not one of the configured hosts"),
        ] {
            try yaml.write(toFile: path, atomically: true, encoding: .utf8)
            let (status, output) = try ServerProcess.run(ServerProcess.executable("starling"), ["--config", path, "--check"])
            XCTAssertEqual(status, 78, output)
            XCTAssertTrue(output.contains(expected), output)
        }
    }
}

