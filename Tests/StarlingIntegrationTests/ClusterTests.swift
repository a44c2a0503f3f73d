import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Nodes of one cluster: real `starling` processes on loopback sharing one real PostgreSQL database.
final class TestCluster {
    static let secret = "a-test-cluster-secret-0123456789"
    let database: String
    private(set) var nodes: [String: ServerProcess] = [:]
    let deadAfter: Double

    init(nodes names: [String], users: [(String, String)], deadAfter: Double = 2, extraConfig: String = "", files: [String: String] = [:],
         listenerOptions: String = "", extraListeners: [String] = []) throws {
        guard ProcessInfo.processInfo.environment["STARLING_TEST_BACKEND"] != "postgresql" else {
            throw XCTSkip("cluster tests always run on PostgreSQL; they ran in the first pass")
        }
        guard let base = ServerProcess.postgresURL else { throw XCTSkip("no PostgreSQL: run scripts/test") }
        database = try ServerProcess.freshDatabase(base)
        self.deadAfter = deadAfter
        for (index, name) in names.enumerated() {
            nodes[name] = try ServerProcess(
                extraConfig: """
                cluster: { name: test, node: \(name), link: "127.0.0.1:0", secret_file: secret.txt, heartbeat: 0.2, dead_after: \(deadAfter) }
                \(extraConfig)
                """,
                users: index == 0 ? users : [], files: files.merging(["secret.txt": Self.secret]) { $1 }, database: database,
                listenerOptions: listenerOptions, extraListeners: extraListeners)
        }
    }

    subscript(name: String) -> ServerProcess { nodes[name]! }

    func restart(_ name: String) throws {
        nodes[name] = try ServerProcess(restarting: nodes[name]!)
    }

    /// `starlingctl cluster-status --json` on `node`, as the peers' states by name.
    func peerStates(on node: String) throws -> [String: String] {
        try Self.peerStates(on: self[node])
    }

    static func peerStates(on server: ServerProcess) throws -> [String: String] {
        let (status, output) = try server.ctl(["cluster-status", "--json"])
        guard status == 0, let object = try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any],
              let nodes = object["nodes"] as? [[String: Any]] else { throw TestClientError.unexpected("cluster-status: \(output)") }
        var states: [String: String] = [:]
        for entry in nodes { states[entry["node"] as? String ?? "?"] = entry["state"] as? String }
        return states
    }

    /// Waits until `node` sees each of `peers` in `state` (links come up within a few heartbeats; a lost
    /// node is noticed after `dead_after`).
    func waitUntil(_ node: String, sees peers: [String], as state: String, timeout: Double = 20) async throws {
        try await Self.waitUntil(self[node], named: node, sees: peers, as: state, timeout: timeout)
    }

    /// Waits until every node sees every other up.
    func waitUntilLinked() async throws {
        for node in nodes.keys.sorted() {
            try await waitUntil(node, sees: nodes.keys.filter { $0 != node }.sorted(), as: "up")
        }
    }

    static func waitUntil(_ server: ServerProcess, named node: String, sees peers: [String], as state: String, timeout: Double = 20) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        var last: [String: String] = [:]
        while Date() < deadline {
            last = try peerStates(on: server)
            if peers.allSatisfy({ last[$0] == state }) { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw TestClientError.unexpected("\(node) never saw \(peers) \(state): \(last)")
    }

    func stopAll() {
        for (_, node) in nodes where node.process.isRunning { XCTAssertEqual(node.stop(), 0, node.log) }
    }
}

/// A port nothing listens on right now (bound, read, released).
struct ServerSocketProbe {
    let port: Int

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw TestClientError.unexpected("cannot find a free port") }
        port = Int(UInt16(bigEndian: address.sin_port))
    }
}

final class ClusterTests: XCTestCase {
    static let users = [("alice", "alice-pw"), ("bob", "bob-pw"), ("carol", "carol-pw")]

    private func login(_ cluster: TestCluster, _ node: String, _ user: String, resource: String? = nil, presence: Bool = true) async throws -> TestClient {
        try await TestClient.login(port: cluster[node].directTLSPort, domain: "localhost", tls: .direct, username: user, password: "\(user)-pw",
                                   resource: resource, presence: presence)
    }

    private func available(_ client: TestClient, from: String) async throws -> XMLElement {
        try await client.expect("presence from \(from)") { $0.name == "presence" && $0[attribute: "type"] == nil && ($0[attribute: "from"] ?? "").hasPrefix(from) }
    }

    private func unavailable(_ client: TestClient, from: String) async throws -> XMLElement {
        try await client.expect("unavailable from \(from)") { $0.name == "presence" && $0[attribute: "type"] == "unavailable" && ($0[attribute: "from"] ?? "").hasPrefix(from) }
    }

    private func message(_ client: TestClient, _ body: String) async throws -> XMLElement {
        try await client.expect("message '\(body)'") { $0.name == "message" && $0.child("body")?.text == body }
    }

    /// Enables resumable stream management on `client`; returns the resumption id.
    private func enableResumption(_ client: TestClient) async throws -> String {
        client.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        let enabled = try await client.expect("stream management enabled") { $0.name == "enabled" }
        return try XCTUnwrap(enabled[attribute: "id"])
    }

    /// A new connection to `node` that logs in as `user` and resumes the session `id`.
    private func resume(_ cluster: TestCluster, on node: String, _ user: String, id: String) async throws -> TestClient {
        let client = try await TestClient.connect(port: cluster[node].directTLSPort, domain: "localhost", tls: .direct)
        _ = try await client.openStream()
        try await client.authenticate(username: user, password: "\(user)-pw", mechanism: "SCRAM-SHA-256")
        client.send("<resume xmlns='urn:xmpp:sm:3' previd='\(id)' h='0'/>")
        let answer = try await client.expect("resumed") { $0.namespace == "urn:xmpp:sm:3" && ($0.name == "resumed" || $0.name == "failed") }
        XCTAssertEqual(answer.name, "resumed", answer.serialized())
        return client
    }

    func testThreeNodesServeOneService() async throws {
        let cluster = try TestCluster(nodes: ["a", "b", "c"], users: Self.users)
        defer { cluster.stopAll() }
        try await cluster.waitUntil("a", sees: ["b", "c"], as: "up")
        try await cluster.waitUntil("c", sees: ["a", "b"], as: "up")

        let alice = try await login(cluster, "a", "alice", resource: "desk")
        let bob = try await login(cluster, "b", "bob", resource: "phone")
        try await befriend(alice, "alice@localhost", bob, "bob@localhost")

        // Messages both ways, to the bare and the full JID; an IQ to a resource and its answer.
        send(alice, to: "bob@localhost", "hello from node a")
        let hello = try await message(bob, "hello from node a")
        XCTAssertEqual(hello[attribute: "from"], "alice@localhost/desk")
        send(bob, to: "alice@localhost/desk", "hello from node b")
        let reply = try await message(alice, "hello from node b")
        XCTAssertEqual(reply[attribute: "from"], "bob@localhost/phone")
        alice.send("<iq type='get' id='v1' to='bob@localhost/phone'><query xmlns='jabber:iq:version'/></iq>")
        let request = try await bob.expect("alice's iq") { $0.name == "iq" && $0[attribute: "id"] == "v1" }
        XCTAssertEqual(request[attribute: "from"], "alice@localhost/desk")
        bob.send("<iq type='result' id='v1' to='alice@localhost/desk'><query xmlns='jabber:iq:version'><name>bob's client</name></query></iq>")
        let answer = try await alice.expect("bob's answer") { $0.name == "iq" && $0[attribute: "id"] == "v1" }
        XCTAssertEqual(answer[attribute: "type"], "result")
        XCTAssertEqual(answer[attribute: "from"], "bob@localhost/phone")

        // A resource on a third node: alice's second resource on c sees bob at once (the probe is answered
        // from the replicated table) and gets carbons of what alice sends from a.
        let aliceOnC = try await login(cluster, "c", "alice", resource: "laptop", presence: false)
        aliceOnC.send("<iq type='set' id='carbons'><enable xmlns='urn:xmpp:carbons:2'/></iq>")
        _ = try await aliceOnC.expect("carbons on") { $0[attribute: "id"] == "carbons" && $0[attribute: "type"] == "result" }
        aliceOnC.send("<presence/>")
        _ = try await available(aliceOnC, from: "bob@localhost/phone")
        send(alice, to: "bob@localhost", "with a carbon")
        _ = try await message(bob, "with a carbon")
        let carbon = try await aliceOnC.expect("sent carbon") { $0.child("sent", namespace: "urn:xmpp:carbons:2") != nil }
        XCTAssertEqual(carbon.child("sent")?.child("forwarded")?.child("message")?.child("body")?.text, "with a carbon")

        // Every node lists every session.
        let (status, users) = try cluster["b"].ctl(["connected-users"])
        XCTAssertEqual(status, 0, users)
        XCTAssertEqual(users.split(separator: "\n").sorted(), ["alice@localhost/desk", "alice@localhost/laptop", "bob@localhost/phone"])
        let (_, table) = try cluster["a"].ctl(["cluster-status"])
        XCTAssertTrue(table.contains("3 node(s)"), table)

        // The same resource bound on another node replaces the first binding, wherever it was.
        let first = try await login(cluster, "a", "carol", resource: "same")
        _ = try await login(cluster, "c", "carol", resource: "same")
        let condition = try await first.expectStreamError()
        XCTAssertEqual(condition, "conflict")

        // carol deletes her account (in-band, XEP-0077) through node c: her session on node a ends too.
        let second = try await login(cluster, "a", "carol", resource: "other")
        let carolOnC = try await login(cluster, "c", "carol", resource: "leaving")
        let removed = try await carolOnC.iq("<iq type='set' id='remove'><query xmlns='jabber:iq:register'><remove/></query></iq>", id: "remove")
        XCTAssertEqual(removed[attribute: "type"], "result", removed.serialized())
        let ended = try await second.expectStreamError()
        XCTAssertEqual(ended, "not-authorized")

        // The archive is the cluster's: bob reads on node c what alice sent him through a and b.
        let bobOnC = try await login(cluster, "c", "bob", resource: "tablet", presence: false)
        var bodies: [String] = []
        for _ in 0..<50 {
            bodies = try await MAM.query(bobOnC, fields: ["with": ["alice@localhost"]]).bodies
            if bodies.contains("with a carbon") { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        XCTAssertEqual(bodies, ["hello from node a", "hello from node b", "with a carbon"])
    }

    /// XEP-0484 through a load balancer: a token one node issued logs in on another (every node derives tokens
    /// from the cluster's secret; the certificate binding is the node's own).
    func testAFASTTokenIssuedOnOneNodeLogsInOnAnother() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: Self.users)
        defer { cluster.stopAll() }
        let first = try await TestClient.connect(port: cluster["a"].directTLSPort, domain: "localhost", tls: .direct)
        _ = try await first.openStream()
        let success = try await first.authenticateSASL2(username: "alice", password: "alice-pw", mechanism: "SCRAM-SHA-256", requestToken: "HT-SHA-256-ENDP")
        let token = try XCTUnwrap(TestClient.fastToken(in: success), success.serialized()).token
        await first.close()
        let second = try await TestClient.connect(port: cluster["b"].directTLSPort, domain: "localhost", tls: .direct)
        _ = try await second.openStream()
        try await second.authenticateFAST(username: "alice", token: token, mechanism: "HT-SHA-256-ENDP", bindTag: "Talk")
        XCTAssertEqual(second.boundJID?.bare.description, "alice@localhost")
        await second.close()
    }

    /// XEP-0198 through a load balancer: a phone detached on node a comes back on node b, resumes there with
    /// what it had not acknowledged and what came meanwhile, keeps its resource and presence (its contact
    /// sees no unavailable), and what is sent afterwards reaches it on b.
    func testStreamManagementResumesOnAnotherNode() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: Self.users)
        defer { cluster.stopAll() }
        try await cluster.waitUntilLinked()
        let bob = try await login(cluster, "b", "bob", resource: "desk")
        let phone = try await login(cluster, "a", "alice", resource: "phone")
        try await befriend(phone, "alice@localhost", bob, "bob@localhost")
        let id = try await enableResumption(phone)
        XCTAssertTrue(id.hasSuffix(".a"), "the id names the node holding the session: \(id)")
        bob.send("<message to='alice@localhost/phone' type='chat'><body>before the tunnel</body></message>")
        _ = try await message(phone, "before the tunnel")
        await phone.drop()
        bob.send("<message to='alice@localhost/phone' type='chat'><body>while in the tunnel</body></message>")

        let back = try await resume(cluster, on: "b", "alice", id: id)
        _ = try await message(back, "before the tunnel")
        _ = try await message(back, "while in the tunnel")
        bob.send("<message to='alice@localhost/phone' type='chat'><body>after</body></message>")
        let after = try await message(back, "after")
        XCTAssertEqual(after[attribute: "to"], "alice@localhost/phone", "the same resource, now on b")
        // Still available to bob: a message to alice's bare JID reaches the resumed session.
        bob.send("<message to='alice@localhost' type='chat'><body>to the account</body></message>")
        _ = try await message(back, "to the account")
        // The id still names a, which no longer holds the session: a asks the node that has the account's
        // resource now.
        await back.drop()
        bob.send("<message to='alice@localhost/phone' type='chat'><body>second tunnel</body></message>")
        let again = try await resume(cluster, on: "a", "alice", id: id)
        _ = try await message(again, "second tunnel")
        // Everything bob sent after the first move arrived before this ping's answer: no unavailable among it.
        _ = try await bob.iq("<iq type='get' id='sync' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", id: "sync")
        let unavailable = bob.passedOver.first { $0.name == "presence" && $0[attribute: "type"] == "unavailable" }
        XCTAssertNil(unavailable, "bob saw alice go: \(unavailable?.serialized() ?? "")")
        await again.close()
        await bob.close()
    }

    /// A session resumed on another node takes along where its directed presence went: a room it joined
    /// and an account it sent presence to (not a contact) both hear when it goes, from the new node.
    func testDirectedPresenceGoesWithASessionResumedOnAnotherNode() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: Self.users)
        defer { cluster.stopAll() }
        try await cluster.waitUntilLinked()
        let bob = try await login(cluster, "b", "bob")
        let carol = try await login(cluster, "b", "carol")
        let phone = try await login(cluster, "a", "alice", resource: "phone")
        _ = try await MUC.createInstantRoom(bob, "lounge", nick: "bob")
        _ = try await MUC.join(phone, "lounge", nick: "alice")
        _ = try await MUC.presence(bob, from: "lounge@conference.localhost/alice")
        phone.send("<presence to='carol@localhost'/>")
        _ = try await available(carol, from: "alice@localhost/phone")
        let id = try await enableResumption(phone)
        await phone.drop()
        let back = try await resume(cluster, on: "b", "alice", id: id)
        MUC.groupchat(back, "lounge", "still in the room")
        _ = try await MUC.message(bob, from: "lounge@conference.localhost/alice", body: "still in the room")

        back.send("<presence type='unavailable'/>")
        let left = try await MUC.presence(bob, from: "lounge@conference.localhost/alice", type: "unavailable")
        XCTAssertNotNil(left.child("x", namespace: "http://jabber.org/protocol/muc#user"), left.serialized())
        _ = try await carol.expect("alice's unavailable presence") {
            $0.name == "presence" && $0[attribute: "from"] == "alice@localhost/phone" && $0[attribute: "type"] == "unavailable"
        }
        await back.close()
        await bob.close()
        await carol.close()
    }

    /// A Lua policy that asks `starling.in_roster` (examples/lua/strangers.lua) judges a session resumed on
    /// another node by its roster there, and the node it left does not keep a copy that goes stale.
    func testLuaRosterChecksFollowASessionAcrossNodes() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: Self.users,
                                      extraConfig: "modules:\n  disco: {}\n  roster: {}\n  presence: {}\n  stream_management: {}\n  lua:\n    scripts: [strangers.lua]",
                                      files: ["strangers.lua": try LuaHooksTests.example("strangers.lua")])
        defer { cluster.stopAll() }
        try await cluster.waitUntilLinked()
        let bob = try await login(cluster, "b", "bob")
        let carol = try await login(cluster, "b", "carol")
        var alice = try await login(cluster, "a", "alice", resource: "phone")
        try await befriend(alice, "alice@localhost", bob, "bob@localhost")
        let id = try await enableResumption(alice)

        /// alice's session leaves its connection and resumes on `node`.
        func move(to node: String) async throws {
            await alice.drop()
            alice = try await resume(cluster, on: node, "alice", id: id)
            // What alice sends follows her session's binding over the link: once bob has it, node b
            // routes to her where she is now (before, it would rightly keep messages to her offline).
            send(alice, to: "bob@localhost", "now on \(node)")
            _ = try await message(bob, "now on \(node)")
        }
        /// Whether carol's message reached alice: bob's, sent after carol's was handled, marks the end.
        func carolGetsThrough(_ attempt: Int) async throws -> Bool {
            carol.send("<message to='alice@localhost/phone' type='chat'><body>stranger \(attempt)</body></message>")
            _ = try await carol.iq("<iq type='get' id='sync\(attempt)' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", id: "sync\(attempt)")
            send(bob, to: "alice@localhost/phone", "friend \(attempt)")
            _ = try await message(alice, "friend \(attempt)")
            return alice.passedOver.contains { $0.name == "message" && $0.child("body")?.text == "stranger \(attempt)" }
        }

        // On b, where alice's account had no session before, her roster is loaded when the session arrives
        // (a moment after: until then the policy does not know and lets messages pass).
        try await move(to: "b")
        var dropped = false
        for attempt in 0..<50 where !dropped { dropped = try await !carolGetsThrough(attempt) }
        XCTAssertTrue(dropped, "node b never judged carol by alice's roster")

        // alice adds carol on b and goes back to a: a judges by the roster as it is now, not as it was.
        let added = try await alice.iq("<iq type='set' id='add'><query xmlns='jabber:iq:roster'><item jid='carol@localhost'/></query></iq>", id: "add")
        XCTAssertEqual(added[attribute: "type"], "result", added.serialized())
        try await move(to: "a")
        let through = try await carolGetsThrough(100)
        XCTAssertTrue(through, "node a kept a stale roster for alice")
    }

    /// What an account keeps per node while it has a session there (its blocklist, its privacy lists, its
    /// avatar hash) is there for a session resumed from another node too, and so is the session's active
    /// privacy list: nothing it blocked gets through.
    func testAResumedSessionKeepsItsBlocklistPrivacyListsAndAvatarOnItsNewNode() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: Self.users)
        defer { cluster.stopAll() }
        try await cluster.waitUntilLinked()
        let bob = try await login(cluster, "b", "bob")
        let carol = try await login(cluster, "b", "carol")
        let phone = try await login(cluster, "a", "alice", resource: "phone")
        try await befriend(phone, "alice@localhost", bob, "bob@localhost")
        let blocked = try await phone.iq("<iq type='set' id='block'><block xmlns='urn:xmpp:blocking'><item jid='carol@localhost'/></block></iq>", id: "block")
        XCTAssertEqual(blocked[attribute: "type"], "result", blocked.serialized())
        let list = "<list name='noBob'><item type='jid' value='bob@localhost' action='deny' order='1'><message/></item></list>"
        for (id, body) in [("list", list), ("active", "<active name='noBob'/>")] {
            let answer = try await phone.iq("<iq type='set' id='\(id)'><query xmlns='jabber:iq:privacy'>\(body)</query></iq>", id: id)
            XCTAssertEqual(answer[attribute: "type"], "result", answer.serialized())
        }
        let photo = Data("not really a png".utf8).base64EncodedString()
        let vCard = try await phone.iq("<iq type='set' id='vc'><vCard xmlns='vcard-temp'><PHOTO><TYPE>image/png</TYPE><BINVAL>\(photo)</BINVAL></PHOTO></vCard></iq>", id: "vc")
        XCTAssertEqual(vCard[attribute: "type"], "result", vCard.serialized())
        let id = try await enableResumption(phone)
        await phone.drop()
        let back = try await resume(cluster, on: "b", "alice", id: id)

        // Node b reads what alice keeps as her session arrives (a moment after: until then, what comes is
        // delivered as on a node that has not read it yet).
        func refused(_ sender: TestClient, _ what: String) async throws -> Bool {
            for attempt in 0..<50 {
                sender.send("<message to='alice@localhost/phone' type='chat' id='\(what)\(attempt)'><body>\(what) \(attempt)</body></message>")
                do {
                    _ = try await sender.expect("refusal", timeout: 1) { $0.name == "message" && $0[attribute: "type"] == "error" && $0[attribute: "id"] == "\(what)\(attempt)" }
                    return true
                } catch {
                    _ = try await message(back, "\(what) \(attempt)")
                }
            }
            return false
        }
        let carolRefused = try await refused(carol, "blocked")
        XCTAssertTrue(carolRefused, "carol, blocked, reached alice's resumed session")
        let bobRefused = try await refused(bob, "denied")
        XCTAssertTrue(bobRefused, "bob, denied by the session's active privacy list, reached alice's resumed session")
        var hash: String?
        for attempt in 0..<50 where hash == nil {
            back.send("<presence><status>\(attempt)</status></presence>")
            let presence = try await bob.expect("alice's presence \(attempt)") { $0.name == "presence" && $0.child("status")?.text == "\(attempt)" }
            hash = presence.child("x", namespace: "vcard-temp:x:update")?.child("photo")?.text
        }
        XCTAssertEqual(hash?.count, 40, "alice's presence from node b never carried her avatar's hash")
    }

    func testAKilledNodeIsDroppedAndItsUsersGetOfflineMessagesAfterItRejoins() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: Self.users)
        defer { cluster.stopAll() }
        try await cluster.waitUntil("a", sees: ["b"], as: "up")
        let alice = try await login(cluster, "a", "alice")
        let bob = try await login(cluster, "b", "bob")
        try await befriend(alice, "alice@localhost", bob, "bob@localhost")

        kill(cluster["b"].process.processIdentifier, SIGKILL)
        cluster["b"].process.waitUntilExit()
        // Within dead_after (2 s here) node a drops b's sessions and tells bob's contacts he is gone.
        _ = try await unavailable(alice, from: "bob@localhost")
        try await cluster.waitUntil("a", sees: ["b"], as: "lost")
        send(alice, to: "bob@localhost", "while your node was down")
        let (_, users) = try cluster["a"].ctl(["connected-users"])
        XCTAssertFalse(users.contains("bob@"), users)

        try cluster.restart("b")
        try await cluster.waitUntil("a", sees: ["b"], as: "up")
        let bobAgain = try await login(cluster, "b", "bob")
        let stored = try await message(bobAgain, "while your node was down")
        XCTAssertNotNil(stored.child("delay", namespace: "urn:xmpp:delay"))
        _ = try await available(alice, from: "bob@localhost")
    }

    func testALinkCutIsDetectedAndHealedWithoutARestart() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: Self.users)
        defer {
            kill(cluster["b"].process.processIdentifier, SIGCONT)
            cluster.stopAll()
        }
        try await cluster.waitUntil("a", sees: ["b"], as: "up")
        let alice = try await login(cluster, "a", "alice")
        let bob = try await login(cluster, "b", "bob")
        try await befriend(alice, "alice@localhost", bob, "bob@localhost")

        // Node b freezes: its link stays open but silent. Node a gives up on it after dead_after.
        kill(cluster["b"].process.processIdentifier, SIGSTOP)
        _ = try await unavailable(alice, from: "bob@localhost")
        try await cluster.waitUntil("a", sees: ["b"], as: "lost")
        send(alice, to: "bob@localhost", "stored while the link was cut")

        // It wakes up: the link comes back, bob's session (which never ended) is known again and his
        // presence reaches alice; new messages reach him live.
        kill(cluster["b"].process.processIdentifier, SIGCONT)
        try await cluster.waitUntil("a", sees: ["b"], as: "up")
        _ = try await available(alice, from: "bob@localhost")
        send(alice, to: "bob@localhost", "after the heal")
        _ = try await message(bob, "after the heal")
    }

    func testRoomsHaveOccupantsOnEveryNodeAndAPersistentRoomOutlivesItsNode() async throws {
        let cluster = try TestCluster(nodes: ["a", "b", "c"], users: Self.users)
        defer { cluster.stopAll() }
        try await cluster.waitUntil("a", sees: ["b", "c"], as: "up")
        try await cluster.waitUntil("b", sees: ["a", "c"], as: "up")
        let alice = try await login(cluster, "a", "alice")
        let bob = try await login(cluster, "b", "bob")
        let carol = try await login(cluster, "c", "carol")

        // The service is served by the node that first had a stanza for it (a); the others forward.
        try await MUC.createInstantRoom(alice, "lobby", nick: "alice")
        let configured = try await MUC.configure(alice, "lobby", ["persistentroom": ["1"]])
        XCTAssertEqual(configured[attribute: "type"], "result", configured.serialized())
        let bobJoined = try await MUC.join(bob, "lobby", nick: "bob")
        XCTAssertEqual(bobJoined.roster.compactMap { $0[attribute: "from"] }, ["lobby@conference.localhost/alice"])
        _ = try await MUC.presence(alice, from: "lobby@conference.localhost/bob")
        _ = try await MUC.join(carol, "lobby", nick: "carol")
        _ = try await MUC.presence(bob, from: "lobby@conference.localhost/carol")
        MUC.groupchat(bob, "lobby", "one room, three nodes")
        for client in [alice, bob, carol] { _ = try await MUC.message(client, from: "lobby@conference.localhost/bob", body: "one room, three nodes") }

        // Node a dies with the room's live state; the stored room comes back on the node that next has a
        // stanza for it, with its configuration.
        kill(cluster["a"].process.processIdentifier, SIGKILL)
        cluster["a"].process.waitUntilExit()
        try await cluster.waitUntil("b", sees: ["a"], as: "lost")
        try await cluster.waitUntil("c", sees: ["a"], as: "lost")
        let rejoined = try await MUC.join(bob, "lobby", nick: "bob")
        XCTAssertFalse(MUC.statuses(rejoined.own).contains(201), "the stored room, not a new one: \(rejoined.own.serialized())")
        _ = try await MUC.join(carol, "lobby", nick: "carol")
        MUC.groupchat(carol, "lobby", "still here")
        _ = try await MUC.message(bob, from: "lobby@conference.localhost/carol", body: "still here")
        let info = try await bob.iq("<iq type='get' to='lobby@conference.localhost' id='info'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "info")
        XCTAssertNotNil(info.child("query")?.elements.first { $0.name == "feature" && $0[attribute: "var"] == "muc_persistent" }, info.serialized())
    }

    /// A rolling restart: each node in turn leaves (its clients are told to reconnect, the others forget it
    /// at once) and comes back; messages sent meanwhile are stored, none is lost.
    func testDrainingNodesOneByOneLosesNoMessage() async throws {
        let cluster = try TestCluster(nodes: ["a", "b", "c"], users: Self.users, deadAfter: 30)
        defer { cluster.stopAll() }
        try await cluster.waitUntil("a", sees: ["b", "c"], as: "up")
        try await cluster.waitUntil("b", sees: ["a", "c"], as: "up")
        let carol = try await login(cluster, "c", "carol")
        for node in ["a", "b"] {
            let bob = try await login(cluster, node, "bob", resource: "r-\(node)")
            // Sent once carol's node knows bob is online (until then it would rightly store the message).
            if node == "a" {
                try await befriend(carol, "carol@localhost", bob, "bob@localhost")
            } else {
                _ = try await available(carol, from: "bob@localhost/r-b")
                // What was stored while a was away reaches bob's next session, here on b.
                _ = try await message(bob, "while a is away")
            }
            send(carol, to: "bob@localhost", "before \(node) leaves")
            _ = try await message(bob, "before \(node) leaves")
            let (status, output) = try cluster[node].ctl(["leave-cluster"])
            XCTAssertEqual(status, 0, output)
            XCTAssertTrue(output.contains("leaving the cluster"), output)
            let condition = try await bob.expectStreamError()
            XCTAssertEqual(condition, "system-shutdown")
            // Told, not timed out: dead_after is 30 s here.
            try await cluster.waitUntil("c", sees: [node], as: "lost", timeout: 10)
            send(carol, to: "bob@localhost", "while \(node) is away")
            cluster[node].process.waitUntilExit()
            XCTAssertEqual(cluster[node].process.terminationStatus, 0, cluster[node].log)
            try cluster.restart(node)
            try await cluster.waitUntil("c", sees: [node], as: "up")
        }
        let bob = try await login(cluster, "c", "bob")
        _ = try await message(bob, "while b is away")
    }

    /// Two nodes that still reach the database but not each other (each link runs through a relay the
    /// test cuts): each drops the other's sessions, stores what it cannot deliver, and both heal on their
    /// own once the relays let links through again.
    func testAPartitionWhileBothNodesKeepTheirDatabase() async throws {
        guard ProcessInfo.processInfo.environment["STARLING_TEST_BACKEND"] != "postgresql" else { throw XCTSkip("ran in the first pass") }
        guard let base = ServerProcess.postgresURL else { throw XCTSkip("no PostgreSQL: run scripts/test") }
        let database = try ServerProcess.freshDatabase(base)
        let ports = try (0..<4).map { _ in try ServerSocketProbe().port }
        let (linkA, linkB, toB, toA) = (ports[0], ports[1], ports[2], ports[3])
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Interop/tcp_relay.py").path
        var relays: [Process] = []
        for (listen, target) in [(toB, linkB), (toA, linkA)] {
            let relay = Process()
            relay.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            relay.arguments = ["python3", script, String(listen), String(target)]
            let output = Pipe()
            relay.standardOutput = output
            try relay.run()
            _ = output.fileHandleForReading.availableData  // "ready"
            relays.append(relay)
        }
        defer {
            for relay in relays {
                kill(relay.processIdentifier, SIGKILL)
                relay.waitUntilExit()
            }
        }
        func node(_ name: String, link: Int, peer: Int, users: [(String, String)]) throws -> ServerProcess {
            try ServerProcess(
                extraConfig: "cluster: { name: split, node: \(name), link: \"127.0.0.1:\(link)\", secret_file: secret.txt, discovery: static, "
                    + "peers: [\"127.0.0.1:\(peer)\"], heartbeat: 0.2, dead_after: 2 }",
                users: users, files: ["secret.txt": TestCluster.secret], database: database)
        }
        let a = try node("a", link: linkA, peer: toB, users: Self.users)
        let b = try node("b", link: linkB, peer: toA, users: [])
        defer { for server in [a, b] { XCTAssertEqual(server.stop(), 0) } }
        // Linked before anyone logs in: until then each node rightly takes the other's users for offline.
        try await TestCluster.waitUntil(a, named: "a", sees: ["b"], as: "up")
        try await TestCluster.waitUntil(b, named: "b", sees: ["a"], as: "up")
        let alice = try await TestClient.login(port: a.directTLSPort, domain: "localhost", tls: .direct, username: "alice", password: "alice-pw")
        let bob = try await TestClient.login(port: b.directTLSPort, domain: "localhost", tls: .direct, username: "bob", password: "bob-pw")
        try await befriend(alice, "alice@localhost", bob, "bob@localhost")

        for relay in relays { kill(relay.processIdentifier, SIGUSR1) }
        _ = try await unavailable(alice, from: "bob@localhost")
        _ = try await unavailable(bob, from: "alice@localhost")
        // Neither guesses: what cannot reach its owner is stored.
        send(alice, to: "bob@localhost", "during the split")
        let (_, users) = try a.ctl(["connected-users"])
        XCTAssertEqual(users.split(separator: "\n"), ["alice@localhost/" + (alice.boundJID?.resourcepart ?? "?")], users)

        for relay in relays { kill(relay.processIdentifier, SIGUSR2) }
        _ = try await available(alice, from: "bob@localhost")
        _ = try await available(bob, from: "alice@localhost")
        send(alice, to: "bob@localhost", "after the split")
        _ = try await message(bob, "after the split")
        // The stored message waits for bob's next initial presence.
        bob.send("<presence type='unavailable'/>")
        bob.send("<presence/>")
        let stored = try await message(bob, "during the split")
        XCTAssertNotNil(stored.child("delay", namespace: "urn:xmpp:delay"))
    }

    /// Settings an account changes on one node hold on the others: archiving preferences (consulted on the
    /// sender's node) and blocklists (cached where the account has sessions).
    func testPreferencesAndBlocklistsChangedOnOneNodeHoldOnTheOthers() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: Self.users)
        defer { cluster.stopAll() }
        try await cluster.waitUntil("a", sees: ["b"], as: "up")
        let alice = try await login(cluster, "a", "alice")
        let aliceOnB = try await login(cluster, "b", "alice", resource: "second")
        let bob = try await login(cluster, "b", "bob")
        try await befriend(alice, "alice@localhost", bob, "bob@localhost")

        let prefs = try await alice.iq("<iq type='set' id='prefs'><prefs xmlns='urn:xmpp:mam:2' default='never'/></iq>", id: "prefs")
        XCTAssertEqual(prefs[attribute: "type"], "result")
        // Node b archives bob's messages to alice (the sender's node decides) until it has heard of them.
        var archived = true
        for attempt in 0..<50 where archived {
            send(bob, to: "alice@localhost", "probe \(attempt)")
            _ = try await message(alice, "probe \(attempt)")
            archived = try await MAM.query(alice, fields: ["with": ["bob@localhost"]]).bodies.contains("probe \(attempt)")
        }
        XCTAssertFalse(archived, "node b never heard of alice's preferences")

        // alice blocks carol on node a; node b, where alice also has a session, refuses carol from then on.
        let carol = try await login(cluster, "b", "carol")
        let blocked = try await alice.iq("<iq type='set' id='block'><block xmlns='urn:xmpp:blocking'><item jid='carol@localhost'/></block></iq>", id: "block")
        XCTAssertEqual(blocked[attribute: "type"], "result")
        var refused = false
        for attempt in 0..<50 where !refused {
            carol.send("<message to='alice@localhost/second' type='chat' id='c\(attempt)'><body>hello \(attempt)</body></message>")
            do {
                _ = try await carol.expect("refusal", timeout: 1) { $0.name == "message" && $0[attribute: "type"] == "error" && $0[attribute: "id"] == "c\(attempt)" }
                refused = true
            } catch {
                // Not yet: node b still had the old list, and alice's session there got it.
                _ = try await message(aliceOnB, "hello \(attempt)")
            }
        }
        XCTAssertTrue(refused, "node b never heard of alice's new blocklist")
    }

    func testStaticPeersAndJoiningAtRunTime() async throws {
        guard ProcessInfo.processInfo.environment["STARLING_TEST_BACKEND"] != "postgresql" else { throw XCTSkip("ran in the first pass") }
        guard let base = ServerProcess.postgresURL else { throw XCTSkip("no PostgreSQL: run scripts/test") }
        let database = try ServerProcess.freshDatabase(base)
        let ports = try (0..<3).map { _ in try ServerSocketProbe().port }
        func node(_ name: String, _ index: Int, peers: [Int]) throws -> ServerProcess {
            let peerList = peers.map { "\"127.0.0.1:\(ports[$0])\"" }.joined(separator: ", ")
            return try ServerProcess(
                extraConfig: "cluster: { name: static, node: \(name), link: \"127.0.0.1:\(ports[index])\", secret_file: secret.txt, discovery: static, "
                    + "peers: [\(peerList)], heartbeat: 0.2, dead_after: 2 }",
                users: index == 0 ? Self.users : [], files: ["secret.txt": TestCluster.secret], database: database)
        }
        let a = try node("a", 0, peers: [1])
        let b = try node("b", 1, peers: [0])
        // c knows only a; b learns of c at run time.
        let c = try node("c", 2, peers: [0])
        defer { for server in [a, b, c] { XCTAssertEqual(server.stop(), 0) } }
        func states(_ server: ServerProcess) throws -> [String: String] {
            let (_, output) = try server.ctl(["cluster-status", "--json"])
            let object = try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any]
            return Dictionary(uniqueKeysWithValues: (object?["nodes"] as? [[String: Any]] ?? []).map { ($0["node"] as? String ?? "", $0["state"] as? String ?? "") })
        }
        func wait(_ server: ServerProcess, _ node: String, _ state: String) async throws {
            for _ in 0..<200 {
                if try states(server)[node] == state { return }
                try await Task.sleep(for: .milliseconds(100))
            }
            XCTFail("\(node) never \(state): \(try states(server))")
        }
        try await wait(a, "b", "up")
        try await wait(a, "c", "up")
        XCTAssertNil(try states(b)["c"], "b was never told of c")
        let (status, output) = try b.ctl(["join-cluster", "127.0.0.1:\(ports[2])"])
        XCTAssertEqual(status, 0, output)
        try await wait(b, "c", "up")
        let (refused, why) = try b.ctl(["join-cluster", "nowhere"])
        XCTAssertNotEqual(refused, 0)
        XCTAssertTrue(why.contains("HOST:PORT"), why)

        let alice = try await TestClient.login(port: b.directTLSPort, domain: "localhost", tls: .direct, username: "alice", password: "alice-pw")
        let carol = try await TestClient.login(port: c.directTLSPort, domain: "localhost", tls: .direct, username: "carol", password: "carol-pw")
        try await befriend(alice, "alice@localhost", carol, "carol@localhost")
        send(alice, to: "carol@localhost", "over a joined link")
        _ = try await message(carol, "over a joined link")
    }

    /// `examples/haproxy/haproxy.cfg` in front of three nodes (its ports swapped for the test's), HAProxy
    /// connecting from another loopback address than the clients': the nodes see the clients' addresses.
    func testThroughHAProxyTheNodesSeeTheClientsAddresses() async throws {
        let haproxy = "/usr/sbin/haproxy"
        guard FileManager.default.isExecutableFile(atPath: haproxy) else { throw XCTSkip("no HAProxy: run scripts/bootstrap") }
        let hook = """
        starling.hook("connect", 100, function(connection)
          starling.log("info", "connection from " .. connection.attr.address)
          if connection.attr.address == "127.0.0.9" then return "error" end
          return "pass"
        end)
        """
        let cluster = try TestCluster(nodes: ["a", "b", "c"], users: Self.users,
                                      extraConfig: "modules:\n  roster: {}\n  presence: {}\n  lua:\n    scripts: [addresses.lua]",
                                      files: ["addresses.lua": hook], listenerOptions: ", proxy_protocol: true")
        defer { cluster.stopAll() }
        try await cluster.waitUntil("a", sees: ["b", "c"], as: "up")

        let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("examples/haproxy/haproxy.cfg")
        var config = try String(contentsOf: example, encoding: .utf8)
        let front = (starttls: try Self.freePort(), direct: try Self.freePort())
        config = config.replacingOccurrences(of: "bind 127.0.0.1:5222", with: "bind 127.0.0.1:\(front.starttls)")
            .replacingOccurrences(of: "bind 127.0.0.1:5223", with: "bind 127.0.0.1:\(front.direct)")
        for (index, name) in ["a", "b", "c"].enumerated() {
            config = config.replacingOccurrences(of: "127.0.0.1:\(index + 1)5222", with: "127.0.0.1:\(cluster[name].starttlsPort)")
                .replacingOccurrences(of: "127.0.0.1:\(index + 1)5223", with: "127.0.0.1:\(cluster[name].directTLSPort)")
        }
        // The balancer's own connections come from 127.0.0.3, so the nodes' sockets see that address.
        config = config.replacingOccurrences(of: "    maxconn 100000", with: "    maxconn 1000\n    stats socket \(cluster["a"].directory.path)/haproxy.sock")
            .replacingOccurrences(of: "timeout server 11m", with: "timeout server 11m\n    source 127.0.0.3")
        let configPath = cluster["a"].directory.appendingPathComponent("haproxy.cfg").path
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        let balancer = Process()
        balancer.executableURL = URL(fileURLWithPath: haproxy)
        balancer.arguments = ["-db", "-f", configPath]
        let output = Pipe()
        balancer.standardOutput = output
        balancer.standardError = output
        try balancer.run()
        defer {
            balancer.terminate()
            balancer.waitUntilExit()
        }

        // Logins through the balancer from two client addresses, over both kinds of TLS.
        var clients: [TestClient] = []
        for attempt in 0..<100 {
            do {
                clients.append(try await TestClient.login(port: front.direct, domain: "localhost", tls: .direct, username: "alice", password: "alice-pw",
                                                          resource: "via-balancer", source: "127.0.0.2"))
                break
            } catch where attempt < 99 {
                try await Task.sleep(for: .milliseconds(100))
            }
        }
        clients.append(try await TestClient.login(port: front.starttls, domain: "localhost", tls: .starttls, username: "bob", password: "bob-pw",
                                                  source: "127.0.0.4"))
        XCTAssertEqual(clients.count, 2)
        // The hook refuses 127.0.0.9 by its real address (the nodes' sockets only ever see 127.0.0.3).
        do {
            _ = try await TestClient.login(port: front.direct, domain: "localhost", tls: .direct, username: "carol", password: "carol-pw", source: "127.0.0.9")
            XCTFail("a refused address got in")
        } catch {}
        let logs = ["a", "b", "c"].map { cluster[$0].log }.joined()
        XCTAssertTrue(logs.contains("connection from 127.0.0.2"), logs)
        XCTAssertTrue(logs.contains("connection from 127.0.0.4"), logs)
        XCTAssertTrue(logs.contains("connection from 127.0.0.9"), logs)
        for client in clients { await client.close() }
    }

    private static func freePort() throws -> Int {
        let socket = try ServerSocketProbe()
        return socket.port
    }

    func testClusterConfigurationIsCheckedAtLoad() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-cluster-config-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let config = directory.appendingPathComponent("starling.yml").path
        try "hosts: [localhost]\ncluster:\n  node: a\n  link: 127.0.0.1:7000\n  secret_file: secret.txt\n".write(toFile: config, atomically: true, encoding: .utf8)
        let (status, output) = try ServerProcess.run(ServerProcess.executable("starling"), ["--config", config, "--check"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("starling.yml:") && output.contains("clustering needs the postgresql storage backend"), output)
    }
}
