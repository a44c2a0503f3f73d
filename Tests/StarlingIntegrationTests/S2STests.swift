import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import StarlingAPI
import StarlingTestClient
import XCTest

/// Federation between two real `starling` servers on loopback, each with its own domain and a static
/// route to the other: subscriptions, presence, messages and IQs both ways, with dialback (self-signed
/// certificates) and with SASL EXTERNAL (certificates from a test CA); bounces when the peer is gone.
final class S2STests: XCTestCase {
    /// Two servers that route to each other (and to each other's MUC service); `s2s(domain)` goes into each one's `s2s:` section.
    private func startPair(files: (String) -> [String: String] = { _ in [:] }, tls: (String) -> String = { _ in "" },
                           s2s: (String) -> String = { _ in "  ca_file: \"\"" }) throws -> (ServerProcess, ServerProcess) {
        let portA = try ServerProcess.freePort()
        let portB = try ServerProcess.freePort()
        func start(_ domain: String, user: (String, String), own: Int, other: String, otherPort: Int) throws -> ServerProcess {
            try ServerProcess(extraConfig: """
            \(tls(domain))
            s2s:
            \(s2s(domain))
              routes: { \(other): "127.0.0.1:\(otherPort)", conference.\(other): "127.0.0.1:\(otherPort)" }
            """, users: [user], files: files(domain), extraListeners: ["{ type: s2s, address: 127.0.0.1, port: \(own) }",
                                                                 "{ type: http, address: 127.0.0.1, port: 0, metrics: true }"], hosts: [domain])
        }
        let a = try start("a.test", user: ("alice", "alice-pass"), own: portA, other: "b.test", otherPort: portB)
        let b = try start("b.test", user: ("bob", "bob-pass"), own: portB, other: "a.test", otherPort: portA)
        return (a, b)
    }

    /// One server for `hosts` (its user registered on the first) with `s2s` lines in its `s2s:` section (after
    /// `ca_file: ""`, so dialback) and an s2s listener on 127.0.0.1 at each port (0: any; `direct` ones use direct TLS).
    private func federating(_ hosts: [String], user: String, s2s: String, ports: [Int], direct: Set<Int> = [], extraConfig: String = "",
                            files: [String: String] = [:]) throws -> ServerProcess {
        try ServerProcess(extraConfig: "s2s:\n  ca_file: \"\"\n" + s2s.split(separator: "\n").map { "  \($0)" }.joined(separator: "\n") + "\n" + extraConfig,
                          users: [(user, "\(user)-pass")], files: files,
                          extraListeners: ports.map { "{ type: s2s, address: 127.0.0.1, port: \($0)\(direct.contains($0) ? ", tls: direct" : "") }" }, hosts: hosts)
    }

    private func login(_ server: ServerProcess, _ domain: String, _ user: String, resource: String) async throws -> TestClient {
        try await TestClient.login(port: server.starttlsPort, domain: domain, tls: .starttls, username: user, password: "\(user)-pass", resource: resource)
    }

    private func s2sConnections(_ server: ServerProcess) throws -> String {
        let (status, text) = try server.ctl(["s2s-connections"])
        XCTAssertEqual(status, 0, text)
        return text
    }

    func testSubscriptionPresenceMessagesAndIQsOverDialback() async throws {
        let (a, b) = try startPair()
        defer { _ = a.stop(); _ = b.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await login(b, "b.test", "bob", resource: "desk")

        // Subscription both ways, as clients do it; each then sees the other online.
        try await befriend(alice, "alice@a.test", bob, "bob@b.test")
        let roster = try await alice.iq("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>", id: "r1")
        let item = roster.child("query", namespace: "jabber:iq:roster")?.child("item", namespace: "jabber:iq:roster")
        XCTAssertEqual(item?[attribute: "jid"], "bob@b.test")
        XCTAssertEqual(item?[attribute: "subscription"], "both")

        // A message each way.
        send(alice, to: "bob@b.test", "hello from a.test")
        let atBob = try await nextMessage(bob)
        XCTAssertEqual(atBob.child("body")?.text, "hello from a.test")
        XCTAssertEqual(atBob[attribute: "from"], "alice@a.test/phone")
        send(bob, to: "alice@a.test/phone", "hello back")
        let atAlice = try await nextMessage(alice)
        XCTAssertEqual(atAlice.child("body")?.text, "hello back")
        XCTAssertEqual(atAlice[attribute: "from"], "bob@b.test/desk")

        // IQ round trips: the remote server answers for itself, and a remote client answers a ping.
        let version = try await alice.iq("<iq type='get' id='v1' to='b.test'><query xmlns='jabber:iq:version'/></iq>", id: "v1")
        XCTAssertEqual(version[attribute: "type"], "result")
        XCTAssertEqual(version[attribute: "from"], "b.test")
        XCTAssertEqual(version.child("query", namespace: "jabber:iq:version")?.child("name", namespace: "jabber:iq:version")?.text, "Starling")
        alice.send("<iq type='get' id='p1' to='bob@b.test/desk'><ping xmlns='urn:xmpp:ping'/></iq>")
        let ping = try await bob.expect("ping from alice") { $0.name == "iq" && $0[attribute: "id"] == "p1" }
        XCTAssertEqual(ping[attribute: "from"], "alice@a.test/phone")
        bob.send("<iq type='result' id='p1' to='alice@a.test/phone'/>")
        let pong = try await alice.expect("ping answer") { $0.name == "iq" && $0[attribute: "id"] == "p1" }
        XCTAssertEqual(pong[attribute: "type"], "result")
        XCTAssertEqual(pong[attribute: "from"], "bob@b.test/desk")

        // What only local accounts may ask stays refused to remote ones.
        let roster2 = try await alice.iq("<iq type='get' id='r2' to='bob@b.test'><query xmlns='jabber:iq:roster'/></iq>", id: "r2")
        XCTAssertEqual(roster2[attribute: "type"], "error")

        // Going offline reaches the remote contact.
        bob.send("<presence type='unavailable'/>")
        let gone = try await alice.expect("bob offline") { $0.name == "presence" && $0[attribute: "type"] == "unavailable" }
        XCTAssertEqual(gone[attribute: "from"], "bob@b.test/desk")

        // One connection carried everything both ways (XEP-0288), authenticated with dialback (self-signed
        // certificates): a.test opened it, b.test answered on it.
        let fromA = try s2sConnections(a)
        XCTAssertTrue(fromA.hasPrefix("1 s2s stream(s)\noutgoing+bidi b.test [a.test→b.test] ready tls dialback"), fromA)
        let fromB = try s2sConnections(b)
        XCTAssertTrue(fromB.hasPrefix("1 s2s stream(s)\nincoming+bidi a.test [b.test→a.test] ready tls dialback"), fromB)

        // Per remote domain in the metrics.
        let (data, _) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(a.httpPort)/metrics")!)
        let metrics = String(decoding: data, as: UTF8.self)
        XCTAssertTrue(metrics.contains(#"starling_s2s_streams{direction="outgoing"} 1"#), metrics)
        XCTAssertTrue(metrics.contains(#"starling_s2s_stanzas_total{direction="out",domain="b.test"}"#), metrics)
        XCTAssertTrue(metrics.contains(#"starling_s2s_stanzas_total{direction="in",domain="b.test"}"#), metrics)
    }

    func testAnOccupantFromAnotherServerInARoom() async throws {
        let (a, b) = try startPair()
        defer { _ = a.stop(); _ = b.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        let room = "tea@conference.a.test"
        let muc = "http://jabber.org/protocol/muc"
        alice.send("<presence to='\(room)/alice'><x xmlns='\(muc)'/></presence>")
        _ = try await alice.expect("alice in the new room") { $0.name == "presence" && $0[attribute: "from"] == "\(room)/alice" }
        let configured = try await alice.iq("<iq type='set' id='cfg' to='\(room)'><query xmlns='\(muc)#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>", id: "cfg")
        XCTAssertEqual(configured[attribute: "type"], "result", configured.serialized())

        // bob joins from b.test: his server reaches conference.a.test, and the room's traffic comes back to him.
        bob.send("<presence to='\(room)/bob'><x xmlns='\(muc)'/></presence>")
        let own = try await bob.expect("bob's own presence in the room", timeout: 20) { $0.name == "presence" && $0[attribute: "from"] == "\(room)/bob" }
        XCTAssertEqual(own[attribute: "to"], "bob@b.test/desk")
        _ = try await alice.expect("bob joining, seen by alice") { $0.name == "presence" && $0[attribute: "from"] == "\(room)/bob" }
        alice.send("<message to='\(room)' type='groupchat'><body>welcome, bob</body></message>")
        let atBob = try await bob.expect("groupchat at bob") { $0.name == "message" && $0.child("body")?.text == "welcome, bob" }
        XCTAssertEqual(atBob[attribute: "from"], "\(room)/alice")
        bob.send("<message to='\(room)' type='groupchat'><body>thanks</body></message>")
        let atAlice = try await alice.expect("groupchat at alice") { $0.name == "message" && $0.child("body")?.text == "thanks" }
        XCTAssertEqual(atAlice[attribute: "from"], "\(room)/bob")
    }

    func testPEPNotificationsReachAContactAtAnotherServer() async throws {
        let (a, b) = try startPair()
        defer { _ = a.stop(); _ = b.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await TestClient.login(port: b.starttlsPort, domain: "b.test", tls: .starttls, username: "bob", password: "bob-pass",
                                             resource: "desk", presence: false)
        bob.send("<presence/>")
        try await befriend(alice, "alice@a.test", bob, "bob@b.test")
        func publish(_ title: String, id: String) async throws {
            let published = try await alice.iq("<iq type='set' id='\(id)'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='urn:xmpp:tune'><item id='current'><tune xmlns='urn:xmpp:tune'><title>\(title)</title></tune></item></publish></pubsub></iq>", id: id)
            XCTAssertEqual(published[attribute: "type"], "result", published.serialized())
        }
        func isTune(_ title: String) -> (XMLElement) -> Bool {
            { $0.name == "message" && $0[attribute: "from"] == "alice@a.test"
                && $0.child("event", namespace: "http://jabber.org/protocol/pubsub#event")?.child("items", namespace: "http://jabber.org/protocol/pubsub#event")?
                    .child("item", namespace: "http://jabber.org/protocol/pubsub#event")?.child("tune", namespace: "urn:xmpp:tune")?.child("title", namespace: "urn:xmpp:tune")?.text == title }
        }
        try await publish("First", id: "p1")

        // bob's client says it wants tunes; both servers ask it what its capabilities mean, and alice's
        // server then sends alice's newest tune across.
        let features = ["http://jabber.org/protocol/caps", "http://jabber.org/protocol/disco#info", "urn:xmpp:tune+notify", "urn:starling:test:\(UUID().uuidString)"]
        let ver = PubSubTests.capsVer(identity: "client/pc//Starling test", features: features)
        bob.send("<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://starling.example/test' ver='\(ver)'/></presence>")
        var askedBy: Set<String> = []
        while true {
            let next = try await bob.expect("a disco#info query or alice's tune", timeout: 20) {
                ($0.name == "iq" && $0[attribute: "type"] == "get" && $0.child("query", namespace: "http://jabber.org/protocol/disco#info") != nil) || isTune("First")($0)
            }
            if next.name == "message" { break }
            askedBy.insert(next[attribute: "from"] ?? "?")
            var answer = "<iq type='result' id='\(next[attribute: "id"]!)' to='\(next[attribute: "from"]!)'><query xmlns='http://jabber.org/protocol/disco#info' node='\(next.child("query")?[attribute: "node"] ?? "")'>"
            answer += "<identity category='client' type='pc' name='Starling test'/>"
            for feature in features { answer += "<feature var='\(feature)'/>" }
            bob.send(answer + "</query></iq>")
        }
        XCTAssertTrue(askedBy.contains("a.test"), "\(askedBy)")
        // A new tune is pushed to bob as it is published.
        try await publish("Second", id: "p2")
        _ = try await bob.expect("alice's new tune", timeout: 20, where: isTune("Second"))
    }

    /// A cluster federates as one server: a remote domain reaches it through any node, each node opens its
    /// own streams, and the dialback key one node gives out is verified by another (the shared secret).
    func testAClusterFederatesAsOneServer() async throws {
        let portB = try ServerProcess.freePort()
        let cluster = try TestCluster(nodes: ["n1", "n2"], users: [("alice", "alice-pass")],
                                      extraConfig: "s2s:\n  ca_file: \"\"\n  routes: { b.test: \"127.0.0.1:\(portB)\" }",
                                      extraListeners: ["{ type: s2s, address: 127.0.0.1, port: 0 }"])
        defer { cluster.stopAll() }
        try await cluster.waitUntil("n1", sees: ["n2"], as: "up")
        // b.test finds "localhost" at n1 only.
        let b = try federating(["b.test"], user: "bob", s2s: "routes: { localhost: \"127.0.0.1:\(cluster["n1"].s2sPort)\" }", ports: [portB])
        defer { _ = b.stop() }
        let alice = try await TestClient.login(port: cluster["n2"].directTLSPort, domain: "localhost", tls: .direct, username: "alice",
                                               password: "alice-pass", resource: "on-n2")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        // In through n1, across the node link to alice on n2.
        send(bob, to: "alice@localhost/on-n2", "to the cluster")
        let atAlice = try await nextMessage(alice, timeout: 20)
        XCTAssertEqual(atAlice.child("body")?.text, "to the cluster")
        // Out from n2 on a stream of its own; b.test checks n2's dialback key with n1, which verifies it.
        send(alice, to: "bob@b.test", "from n2")
        let atBob = try await nextMessage(bob, timeout: 20)
        XCTAssertEqual(atBob.child("body")?.text, "from n2")
        let fromN2 = try s2sConnections(cluster["n2"])
        XCTAssertTrue(fromN2.contains("outgoing+bidi b.test [localhost→b.test] ready tls dialback"), fromN2)
    }

    func testProbeOnLoginShowsRemoteContactOnline() async throws {
        let (a, b) = try startPair()
        defer { _ = a.stop(); _ = b.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "one")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        try await befriend(alice, "alice@a.test", bob, "bob@b.test")
        await alice.close()
        // A new session of alice probes bob's server, which answers with bob's presence.
        let again = try await login(a, "a.test", "alice", resource: "two")
        let presence = try await again.expect("bob's presence from the probe") {
            $0.name == "presence" && $0[attribute: "type"] == nil && $0[attribute: "from"] == "bob@b.test/desk"
        }
        XCTAssertEqual(presence[attribute: "to"], "alice@a.test/two")
    }

    func testSASLExternalWithCertificatesFromATestCA() async throws {
        let ca = try TestCertificates()
        // Without XEP-0288, so that each server authenticates to the other on a stream of its own.
        let (a, b) = try startPair(files: { ca.files(for: $0) }, tls: { _ in "tls: { certificate: cert.pem, key: key.pem }" },
                                   s2s: { _ in "  ca_file: ca.pem\n  bidi: false" })
        defer { _ = a.stop(); _ = b.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        send(alice, to: "bob@b.test", "signed and sealed")
        let atBob = try await nextMessage(bob)
        XCTAssertEqual(atBob.child("body")?.text, "signed and sealed")
        send(bob, to: "alice@a.test", "received")
        let atAlice = try await nextMessage(alice)
        XCTAssertEqual(atAlice.child("body")?.text, "received")
        let fromA = try s2sConnections(a)
        XCTAssertTrue(fromA.contains("outgoing b.test [a.test→b.test] ready tls(verified) SASL EXTERNAL"), fromA)
        XCTAssertTrue(fromA.contains("incoming b.test [a.test→b.test] ready tls(verified) SASL EXTERNAL"), fromA)
        let fromB = try s2sConnections(b)
        XCTAssertTrue(fromB.contains("outgoing a.test [b.test→a.test] ready tls(verified) SASL EXTERNAL"), fromB)
    }

    func testWithoutDialbackAPeerWithoutAVerifiedCertificateIsRefused() async throws {
        // a.test trusts only the test CA and does no dialback; b.test has a self-signed certificate.
        let ca = try TestCertificates()
        let (a, b) = try startPair(files: { $0 == "a.test" ? ca.files(for: $0) : [:] },
                                   tls: { $0 == "a.test" ? "tls: { certificate: cert.pem, key: key.pem }" : "" },
                                   s2s: { $0 == "a.test" ? "  ca_file: ca.pem\n  dialback: false" : "  ca_file: \"\"" })
        defer { _ = a.stop(); _ = b.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        send(alice, to: "bob@b.test", "out")
        let outgoing = try await alice.expect("refused: b.test's certificate does not verify", timeout: 30) { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertTrue(outgoing.child("error")?.child("text", namespace: Namespace.stanzaErrors)?.text.contains("does not verify") == true, outgoing.serialized())
        send(bob, to: "alice@a.test", "in")
        let incoming = try await bob.expect("refused: no dialback at a.test", timeout: 30) { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(incoming[attribute: "from"], "alice@a.test")
    }

    func testStanzasToAnUnreachableOrVanishedPeerBounce() async throws {
        let (a, b) = try startPair()
        defer { _ = a.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        // No route and no such domain in DNS.
        send(alice, to: "nobody@unknown.invalid", "anyone?")
        let unknown = try await alice.expect("bounce for an unknown domain") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertNotNil(unknown.child("error")?.child("remote-server-not-found", namespace: Namespace.stanzaErrors), unknown.serialized())

        // The peer answers, then goes away: the next message bounces too, and an IQ gets its error.
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        send(alice, to: "bob@b.test", "first")
        _ = try await nextMessage(bob)
        await bob.close()
        XCTAssertEqual(b.stop(), 0)
        send(alice, to: "bob@b.test", "second")
        let gone = try await alice.expect("bounce once b.test is gone", timeout: 30) { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(gone[attribute: "from"], "bob@b.test")
        let condition = gone.child("error")?.elements.first { $0.namespace == Namespace.stanzaErrors }?.name
        XCTAssertTrue(condition == "remote-server-not-found" || condition == "remote-server-timeout", gone.serialized())
        let iq = try await alice.iq("<iq type='get' id='t1' to='b.test'><time xmlns='urn:xmpp:time'/></iq>", id: "t1", timeout: 30)
        XCTAssertEqual(iq[attribute: "type"], "error")
    }

    func testIncomingStreamsPerDomainAreLimited() async throws {
        let portA = try ServerProcess.freePort()
        let portB = try ServerProcess.freePort()
        let b = try federating(["b.test", "b2.test"], user: "bob", s2s: "max_incoming_per_domain: 1\nroutes: { a.test: \"127.0.0.1:\(portA)\" }", ports: [portB])
        defer { _ = b.stop() }
        let a = try federating(["a.test"], user: "alice", s2s: "routes: { b.test: \"127.0.0.1:\(portB)\", b2.test: \"127.0.0.1:\(portB)\" }", ports: [portA])
        defer { _ = a.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        send(alice, to: "bob@b.test", "first stream")
        _ = try await nextMessage(bob)
        // a.test→b2.test needs a second stream from a.test into the same server: one too many.
        send(alice, to: "someone@b2.test", "second stream")
        let refused = try await alice.expect("bounce for the second stream", timeout: 30) { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(refused[attribute: "from"], "someone@b2.test")
        // The first stream carries on.
        send(alice, to: "bob@b.test", "still here")
        let still = try await nextMessage(bob)
        XCTAssertEqual(still.child("body")?.text, "still here")
    }

    func testSRVRecordsPickTheServerAndPreferDirectTLS() async throws {
        let dnsPort = try ServerProcess.freePort()
        let portA = try ServerProcess.freePort()
        let starttlsPort = try ServerProcess.freePort()
        let directPort = try ServerProcess.freePort()
        // XEP-0368: both services at the same priority, so the direct TLS one is tried first. c.test says "no service".
        let dns = try ServerProcess.nameServer(zone: """
        _xmpp-server._tcp.b.test. 60 IN SRV 0 5 \(starttlsPort) b-host.test.
        _xmpps-server._tcp.b.test. 60 IN SRV 0 5 \(directPort) b-host.test.
        b-host.test. 60 IN A 127.0.0.1
        _xmpp-server._tcp.c.test. 60 IN SRV 0 0 0 .
        """, port: dnsPort)
        defer {
            dns.terminate()
            dns.waitUntilExit()
        }
        let b = try federating(["b.test"], user: "bob", s2s: "routes: { a.test: \"127.0.0.1:\(portA)\" }", ports: [starttlsPort, directPort], direct: [directPort])
        defer { _ = b.stop() }
        let a = try federating(["a.test"], user: "alice", s2s: "dns_server: \"127.0.0.1:\(dnsPort)\"", ports: [portA])
        defer { _ = a.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        send(alice, to: "bob@b.test", "found through SRV")
        let atBob = try await nextMessage(bob)
        XCTAssertEqual(atBob.child("body")?.text, "found through SRV")
        let streams = try s2sConnections(a)
        XCTAssertTrue(streams.contains("outgoing+bidi b.test [a.test→b.test] ready tls dialback 127.0.0.1:\(directPort)"), streams)

        send(alice, to: "carol@c.test", "anyone?")
        let none = try await alice.expect("bounce for a domain without the service") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertNotNil(none.child("error")?.child("remote-server-not-found", namespace: Namespace.stanzaErrors), none.serialized())
        XCTAssertTrue(none.child("error")?.child("text", namespace: Namespace.stanzaErrors)?.text.contains("announces no server-to-server service") == true, none.serialized())
    }

    func testASpoofedFromEndsTheStream() async throws {
        // A hostile server that passes dialback for its own domain (evil.test) then claims to speak for b.test.
        let evilPort = try ServerProcess.freePort()
        let a = try federating(["a.test"], user: "alice", s2s: "require_tls: false\nroutes: { evil.test: \"127.0.0.1:\(evilPort)\" }", ports: [0])
        defer { _ = a.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Interop/s2s_spoofer.py").path
        let (status, output) = try ServerProcess.run("/usr/bin/env", ["python3", script, "\(a.s2sPort)", "\(evilPort)", "alice@a.test/phone", "b.test"])
        XCTAssertEqual(status, 0, output)
        XCTAssertEqual(output.split(separator: "\n").map(String.init), ["VERIFIED", "AUTHENTICATED", "invalid-from"], output)
        let honest = try await nextMessage(alice)
        XCTAssertEqual(honest.child("body")?.text, "honest")
        XCTAssertEqual(honest[attribute: "from"], "mallory@evil.test/x")
        // The spoofed one never arrives: the next message alice gets is a later one from her own server.
        send(alice, to: "alice@a.test/phone", "after")
        let next = try await nextMessage(alice)
        XCTAssertEqual(next.child("body")?.text, "after")
    }

    func testLuaPolicyRefusesADomainAndAStanza() async throws {
        let portA = try ServerProcess.freePort()
        let portB = try ServerProcess.freePort()
        let policy = """
        starling.hook("s2s-stream", function(stream)
          if stream.attr.domain == "c.test" then return "error" end
        end)
        starling.hook("s2s-out", function(stanza)
          if stanza.body and stanza.body:find("secret") then return "error" end
        end)
        """
        let a = try federating(["a.test"], user: "alice", s2s: "routes: { b.test: \"127.0.0.1:\(portB)\", c.test: \"127.0.0.1:\(portB)\" }", ports: [portA],
                               extraConfig: "modules: { disco: {}, roster: {}, presence: {}, lua: { scripts: [policy.lua] } }", files: ["policy.lua": policy])
        defer { _ = a.stop() }
        let b = try federating(["b.test", "c.test"], user: "bob", s2s: "routes: { a.test: \"127.0.0.1:\(portA)\" }", ports: [portB])
        defer { _ = b.stop() }
        let (registered, output) = try b.ctl(["register", "carol", "c.test", "carol-pass"])
        XCTAssertEqual(registered, 0, output)
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        let carol = try await login(b, "c.test", "carol", resource: "desk")
        // a.test's policy refuses c.test (a stream c.test opens, and one to it): carol's message bounces at her server, alice's at hers.
        send(carol, to: "alice@a.test", "let me in")
        let refused = try await carol.expect("bounce from a.test's policy", timeout: 30) { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(refused[attribute: "from"], "alice@a.test")
        send(alice, to: "carol@c.test", "no")
        let notSent = try await alice.expect("refused outgoing") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(notSent[attribute: "from"], "carol@c.test")
        // b.test is fine, and the s2s-out hook screens what leaves.
        send(alice, to: "bob@b.test", "a secret")
        let screened = try await alice.expect("bounce from the s2s-out hook") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(screened[attribute: "from"], "bob@b.test")
        send(alice, to: "bob@b.test", "nothing to hide")
        let atBob = try await nextMessage(bob)
        XCTAssertEqual(atBob.child("body")?.text, "nothing to hide")
    }

    func testBlockedDomainsAreRefusedBothWays() async throws {
        let (a, b) = try startPair(s2s: { domain in domain == "a.test" ? "  ca_file: \"\"\n  blocked_domains: [b.test]" : "  ca_file: \"\"" })
        defer { _ = a.stop(); _ = b.stop() }
        let alice = try await login(a, "a.test", "alice", resource: "phone")
        let bob = try await login(b, "b.test", "bob", resource: "desk")
        send(alice, to: "bob@b.test", "out")
        let outBounce = try await alice.expect("refused outgoing") { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertNotNil(outBounce.child("error")?.child("remote-server-not-found", namespace: Namespace.stanzaErrors))
        send(bob, to: "alice@a.test", "in")
        let inBounce = try await bob.expect("refused incoming", timeout: 30) { $0.name == "message" && $0[attribute: "type"] == "error" }
        XCTAssertEqual(inBounce[attribute: "from"], "alice@a.test")
    }
}

/// A private CA and a certificate per domain, made with openssl for the test.
struct TestCertificates {
    let directory: URL

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-ca-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                     "-subj", "/CN=Starling test CA", "-keyout", "ca-key.pem", "-out", "ca.pem",
                     "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    }

    private func openssl(_ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = arguments
        process.currentDirectoryURL = directory
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw TestClientError.unexpected("openssl \(arguments.joined(separator: " ")) failed") }
    }

    /// `ca.pem`, `cert.pem` and `key.pem` for a server of `domain`.
    func files(for domain: String) -> [String: String] {
        do {
            try openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=\(domain)",
                         "-keyout", "\(domain)-key.pem", "-out", "\(domain).csr"])
            try "subjectAltName=DNS:\(domain)\nextendedKeyUsage=serverAuth,clientAuth\n".write(to: directory.appendingPathComponent("\(domain).ext"), atomically: true, encoding: .utf8)
            try openssl(["x509", "-req", "-in", "\(domain).csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
                         "-extfile", "\(domain).ext", "-out", "\(domain).pem"])
            func read(_ name: String) throws -> String { try String(contentsOf: directory.appendingPathComponent(name), encoding: .utf8) }
            return ["ca.pem": try read("ca.pem"), "cert.pem": try read("\(domain).pem"), "key.pem": try read("\(domain)-key.pem")]
        } catch {
            XCTFail("cannot make test certificates: \(error)")
            return [:]
        }
    }
}
