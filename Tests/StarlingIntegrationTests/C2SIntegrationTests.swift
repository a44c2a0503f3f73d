import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// End-to-end: the real server process on loopback, our Swift client and slixmpp.
final class C2SIntegrationTests: XCTestCase {
    static let users = [("alice", "alice-secret"), ("bob", "bob-secret"), ("carol", "carol-secret"), ("dave", "dave-secret")]
    nonisolated(unsafe) static var server: ServerProcess!

    override class func setUp() {
        super.setUp()
        do { server = try ServerProcess(extraConfig: """
        limits:
          max_stanza_size: 16384
        """, users: users) } catch {
            startFailure = error
        }
    }

    nonisolated(unsafe) static var startFailure: (any Error)?

    override func setUpWithError() throws {
        if let failure = Self.startFailure { throw failure }
    }

    override class func tearDown() {
        startFailure = nil
        XCTAssertEqual(server?.stop() ?? 0, 0, "the server should exit cleanly on SIGTERM")
        server = nil
        super.tearDown()
    }

    var server: ServerProcess { Self.server }

    private func login(_ user: String, tls: TestClient.TLSMode = .starttls, mechanism: String = "SCRAM-SHA-256", resource: String? = nil) async throws -> TestClient {
        let password = Self.users.first { $0.0 == user }!.1
        return try await TestClient.login(
            port: tls == .direct ? server.directTLSPort : server.starttlsPort, domain: "localhost", tls: tls,
            username: user, password: password, mechanism: mechanism, resource: resource
        )
    }

    private func message(to: String, body: String, id: String = UUID().uuidString) -> XMLElement {
        var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["to": to, "type": "chat", "id": id])
        message.append(XMLElement(name: "body", namespace: Namespace.client).with(text: body))
        return message
    }

    private func expectMessage(_ client: TestClient, body: String) async throws -> XMLElement {
        let event = try await client.waitFor("message '\(body)'") { event in
            if case .element(let e) = event, e.name == "message", e.child("body")?.text == body { return true }
            return false
        }
        guard case .element(let message) = event else { throw TestClientError.unexpected("\(event)") }
        return message
    }

    private func expectIQ(_ client: TestClient, id: String) async throws -> XMLElement {
        let event = try await client.waitFor("iq \(id)") { event in
            if case .element(let e) = event, e.name == "iq", e[attribute: "id"] == id { return true }
            return false
        }
        guard case .element(let iq) = event else { throw TestClientError.unexpected("\(event)") }
        return iq
    }

    private func stanzaErrorCondition(_ stanza: XMLElement) -> String? {
        stanza.child("error")?.elements.first { $0.namespace == Namespace.stanzaErrors }?.name
    }

    // MARK: Login and chat

    func testTwoUsersChatOverSTARTTLSWithSCRAMSHA256() async throws {
        let alice = try await login("alice", resource: "phone")
        let bob = try await login("bob", resource: "desk")
        XCTAssertEqual(alice.boundJID?.description, "alice@localhost/phone")
        try await Task.sleep(for: .milliseconds(100))

        alice.send(message(to: "bob@localhost", body: "hi bob <&> \u{1F426}"))
        let received = try await expectMessage(bob, body: "hi bob <&> \u{1F426}")
        XCTAssertEqual(received[attribute: "from"], "alice@localhost/phone", "the server stamps the full JID")

        bob.send(message(to: "alice@localhost/phone", body: "hi alice"))
        let reply = try await expectMessage(alice, body: "hi alice")
        XCTAssertEqual(reply[attribute: "from"], "bob@localhost/desk")
        await alice.close()
        await bob.close()
    }

    func testDirectTLSAndChannelBindingVariants() async throws {
        let probe = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        try await probe.openStream()
        XCTAssertEqual(probe.offeredMechanisms, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
        XCTAssertEqual(probe.lastFeatures?.child("sasl-channel-binding")?.child("channel-binding")?[attribute: "type"], "tls-server-end-point")
        await probe.close()

        for (tls, mechanism) in [(TestClient.TLSMode.direct, "SCRAM-SHA-256-PLUS"), (.direct, "SCRAM-SHA-1"), (.starttls, "SCRAM-SHA-1-PLUS"), (.starttls, "PLAIN")] {
            let carol = try await login("carol", tls: tls, mechanism: mechanism)
            carol.send("<iq type='get' id='ping-1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
            let pong = try await expectIQ(carol, id: "ping-1")
            XCTAssertEqual(pong[attribute: "type"], "result", "\(tls) \(mechanism)")
            await carol.close()
        }
    }

    func testChannelBindingMismatchIsRefused() async throws {
        let client = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        try await client.openStream()
        // A man in the middle would present other certificate data than the server's.
        var scram = StarlingSASLShim.client(username: "alice", password: "alice-secret", bindingData: [1, 2, 3])
        client.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256-PLUS'>\(Data(scram.clientFirst()).base64EncodedString())</auth>")
        let challenge = try await client.nextElement()
        let final = try scram.clientFinal(serverFirst: Array(Data(base64Encoded: challenge.text)!))
        client.send("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\(Data(final).base64EncodedString())</response>")
        let failure = try await client.nextElement()
        XCTAssertEqual(failure.name, "failure")
        XCTAssertEqual(failure.elements.first?.name, "not-authorized")
        await client.close()
    }

    func testSlixmppChatsOverSTARTTLSAndDirectTLS() throws {
        for (tls, port, mechanism) in [("starttls", server.starttlsPort, "SCRAM-SHA-256"), ("direct", server.directTLSPort, "SCRAM-SHA-256"), ("starttls", server.starttlsPort, "")] {
            var arguments = ["chat", "--port", "\(port)", "--tls", tls,
                             "--jid-a", "carol@localhost", "--password-a", "carol-secret",
                             "--jid-b", "dave@localhost", "--password-b", "dave-secret"]
            if !mechanism.isEmpty { arguments += ["--mechanism", mechanism] }
            let (status, output) = try ServerProcess.slixmpp(arguments)
            XCTAssertEqual(status, 0, output)
            XCTAssertTrue(output.contains("OK"), output)
        }
    }

    func testSwiftClientAndSlixmppTalkToEachOther() async throws {
        let (process, output) = try ServerProcess.slixmppEcho(port: server.directTLSPort, jid: "dave@localhost", password: "dave-secret", count: 3)
        defer { if process.isRunning { process.terminate() } }
        XCTAssertTrue(output.contains("READY"), output)

        let alice = try await login("alice", resource: "swift")
        for index in 1...3 {
            alice.send(message(to: "dave@localhost", body: "ping \(index)"))
            let echo = try await expectMessage(alice, body: "echo: ping \(index)")
            XCTAssertEqual(echo[attribute: "from"]?.hasPrefix("dave@localhost/"), true)
        }
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0)
        await alice.close()
    }

    // MARK: Authentication failures

    func testWrongPasswordIsRefusedAndServerKeepsServing() async throws {
        let client = try await TestClient.connect(port: server.starttlsPort, domain: "localhost", tls: .starttls)
        try await client.openStream()
        try await client.startTLS()
        let started = Date()
        do {
            try await client.authenticate(username: "alice", password: "wrong", mechanism: "SCRAM-SHA-256")
            XCTFail("a wrong password must not authenticate")
        } catch TestClientError.authenticationFailed(let condition) {
            XCTAssertEqual(condition, "not-authorized")
            XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(started), 0.15, "failures are answered after the configured delay")
        }
        // An unknown user gets exactly the same answer.
        do {
            try await client.authenticate(username: "nobody", password: "x", mechanism: "SCRAM-SHA-256")
            XCTFail("an unknown user must not authenticate")
        } catch TestClientError.authenticationFailed(let condition) {
            XCTAssertEqual(condition, "not-authorized")
        }
        // The same connection may still log in correctly.
        try await client.authenticate(username: "alice", password: "alice-secret", mechanism: "SCRAM-SHA-256")
        await client.close()

        let (status, output) = try ServerProcess.slixmpp(["badauth", "--port", "\(server.starttlsPort)", "--jid-a", "bob@localhost", "--password-a", "nope"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("AUTH-FAILED"), output)
        let bob = try await login("bob")
        await bob.close()
    }

    func testAuthzidNamingAnotherAccountIsRefused() async throws {
        for mechanism in ["SCRAM-SHA-256", "PLAIN"] {
            let client = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
            try await client.openStream()
            do {
                try await client.authenticate(username: "alice", password: "alice-secret", mechanism: mechanism, authzid: "bob@localhost")
                XCTFail("alice must never be bound as bob")
            } catch TestClientError.authenticationFailed(let condition) {
                XCTAssertEqual(condition, "invalid-authzid", mechanism)
            }
            // Naming oneself is fine.
            try await client.authenticate(username: "alice", password: "alice-secret", mechanism: mechanism, authzid: "alice@localhost")
            await client.close()
        }
    }

    func testAuthenticationBeforeTLSIsRefused() async throws {
        let client = try await TestClient.connect(port: server.starttlsPort, domain: "localhost", tls: .none)
        let features = try await client.openStream()
        XCTAssertNotNil(features.child("starttls")?.child("required"))
        XCTAssertTrue(client.offeredMechanisms.isEmpty, "no mechanism is offered before TLS")
        let plain = Data("\0alice\0alice-secret".utf8).base64EncodedString()
        client.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(plain)</auth>")
        let failure = try await client.nextElement()
        XCTAssertEqual(failure.elements.first?.name, "encryption-required")
        client.send("<message to='bob@localhost'><body>sneaky</body></message>")
        let condition = try await client.expectStreamError()
        XCTAssertEqual(condition, "policy-violation")
    }

    // MARK: Bad input

    func testMalformedXMLEndsOnlyThatSession() async throws {
        let alice = try await login("alice", resource: "bad-xml")
        let bob = try await login("bob", resource: "bystander")
        alice.send("<message to='bob@localhost'><body>oops</message>")
        let condition = try await alice.expectStreamError()
        XCTAssertEqual(condition, "not-well-formed")
        _ = try await alice.waitFor("disconnect") { $0 == .disconnected }

        let carol = try await login("carol")
        try await Task.sleep(for: .milliseconds(100))
        carol.send(message(to: "bob@localhost/bystander", body: "still here?"))
        _ = try await expectMessage(bob, body: "still here?")
        await bob.close()
        await carol.close()
    }

    func testEntityDeclarationGetsRestrictedXML() async throws {
        let client = try await TestClient.connect(port: server.starttlsPort, domain: "localhost", tls: .none)
        client.send("<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol1 '&lol;&lol;&lol;&lol;'>]><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
        let condition = try await client.expectStreamError()
        XCTAssertEqual(condition, "restricted-xml")
        _ = try await client.waitFor("disconnect") { $0 == .disconnected }

        let bob = try await login("bob")
        await bob.close()
    }

    func testOversizedStanzaGetsPolicyViolation() async throws {
        let alice = try await login("alice", resource: "big")
        alice.send(message(to: "bob@localhost", body: String(repeating: "x", count: 20000)))
        let condition = try await alice.expectStreamError()
        XCTAssertEqual(condition, "policy-violation")
        let bob = try await login("bob")
        await bob.close()
    }

    func testAClientOverTheReadRateIsReadMoreSlowlyAndLosesNothing() async throws {
        let limited = try ServerProcess(extraConfig: "limits: { read_rate: 8192, read_burst: 2048 }", users: Self.users)
        defer { XCTAssertEqual(limited.stop(), 0) }
        func login(_ user: String) async throws -> TestClient {
            try await TestClient.login(port: limited.directTLSPort, domain: "localhost", tls: .direct, username: user,
                                       password: Self.users.first { $0.0 == user }!.1)
        }
        let alice = try await login("alice"), bob = try await login("bob"), carol = try await login("carol"), dave = try await login("dave")
        // About 24 KB at once: far over the burst, so the server pauses reading alice several times.
        let padding = String(repeating: "x", count: 300)
        for index in 0..<60 { send(alice, to: "bob@localhost", "\(index) \(padding)") }
        // Others are not held up meanwhile.
        send(carol, to: "dave@localhost", "meanwhile")
        _ = try await dave.expect("carol's message") { $0.child("body")?.text == "meanwhile" }
        for index in 0..<60 {
            let message = try await bob.expect("message \(index)", timeout: 30) { $0.name == "message" && $0.child("body") != nil }
            XCTAssertEqual(message.child("body")?.text, "\(index) \(padding)", "in order, nothing lost")
        }
        // What alice sends after her debt is read once it is repaid.
        let pong = try await alice.iq("<iq type='get' id='after-debt' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", id: "after-debt", timeout: 30)
        XCTAssertEqual(pong[attribute: "type"], "result")
    }

    func testSpoofedFromGetsInvalidFrom() async throws {
        let alice = try await login("alice", resource: "spoof")
        alice.send("<message from='bob@localhost/x' to='carol@localhost'><body>I am bob</body></message>")
        let condition = try await alice.expectStreamError()
        XCTAssertEqual(condition, "invalid-from")
    }

    func testUnknownHostInStreamHeader() async throws {
        let client = try await TestClient.connect(port: server.starttlsPort, domain: "elsewhere.example", tls: .none)
        client.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='elsewhere.example' version='1.0'>")
        let condition = try await client.expectStreamError()
        XCTAssertEqual(condition, "host-unknown")
    }

    // MARK: Routing

    func testRoutingErrors() async throws {
        let alice = try await login("alice", resource: "router")
        alice.send("<iq type='get' id='unknown-ns' to='localhost'><query xmlns='urn:example:nothing'/></iq>")
        let reply1 = try await expectIQ(alice, id: "unknown-ns")

        XCTAssertEqual(stanzaErrorCondition(reply1), "service-unavailable")

        alice.send("<iq type='get' id='no-payload' to='localhost'/>")
        let reply2 = try await expectIQ(alice, id: "no-payload")

        XCTAssertEqual(stanzaErrorCondition(reply2), "bad-request")

        alice.send("<iq type='fetch' id='bad-type' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        let reply3 = try await expectIQ(alice, id: "bad-type")

        XCTAssertEqual(stanzaErrorCondition(reply3), "bad-request")

        alice.send("<iq type='get' id='ping-bare'><ping xmlns='urn:xmpp:ping'/></iq>")
        let reply4 = try await expectIQ(alice, id: "ping-bare")

        XCTAssertEqual(reply4[attribute: "type"], "result")

        alice.send("<iq type='get' id='offline-resource' to='bob@localhost/nowhere'><ping xmlns='urn:xmpp:ping'/></iq>")
        let reply5 = try await expectIQ(alice, id: "offline-resource")

        XCTAssertEqual(stanzaErrorCondition(reply5), "service-unavailable")

        alice.send("<message to='nobody@localhost' id='m-unknown' type='chat'><body>hello?</body></message>")
        let unknownUser = try await alice.waitFor("bounce") { if case .element(let e) = $0 { return e[attribute: "id"] == "m-unknown" }; return false }
        guard case .element(let bounce) = unknownUser else { return XCTFail() }
        XCTAssertEqual(bounce[attribute: "type"], "error")
        XCTAssertEqual(stanzaErrorCondition(bounce), "service-unavailable")

        alice.send("<message to='someone@remote.example' id='m-remote' type='chat'><body>hi</body></message>")
        let remote = try await alice.waitFor("remote bounce") { if case .element(let e) = $0 { return e[attribute: "id"] == "m-remote" }; return false }
        guard case .element(let remoteBounce) = remote else { return XCTFail() }
        XCTAssertEqual(stanzaErrorCondition(remoteBounce), "remote-server-not-found")

        alice.send("<message to='bad@@jid' id='m-malformed'><body>hi</body></message>")
        let malformed = try await alice.waitFor("malformed bounce") { if case .element(let e) = $0 { return e[attribute: "id"] == "m-malformed" }; return false }
        guard case .element(let malformedBounce) = malformed else { return XCTFail() }
        XCTAssertEqual(stanzaErrorCondition(malformedBounce), "jid-malformed")

        alice.send("<unknown xmlns='urn:example:x'/>")
        let condition = try await alice.expectStreamError()
        XCTAssertEqual(condition, "unsupported-stanza-type")
    }

    func testMessageToBareJIDGoesToHighestPriorityResources() async throws {
        let low = try await login("carol", resource: "low", )
        let high = try await login("carol", resource: "high")
        low.send("<presence><priority>1</priority></presence>")
        high.send("<presence><priority>5</priority></presence>")
        let bob = try await login("bob", resource: "sender")
        try await Task.sleep(for: .milliseconds(200))
        bob.send(message(to: "carol@localhost", body: "to the highest"))
        _ = try await expectMessage(high, body: "to the highest")
        bob.send(message(to: "carol@localhost/low", body: "direct to low"))
        _ = try await expectMessage(low, body: "direct to low")
        for client in [low, high, bob] { await client.close() }
    }

    // MARK: Sessions

    func testResourceConflictReplacesTheOldSession() async throws {
        let first = try await login("dave", resource: "same")
        let second = try await login("dave", resource: "same")
        let condition = try await first.expectStreamError()
        XCTAssertEqual(condition, "conflict")
        XCTAssertEqual(second.boundJID?.description, "dave@localhost/same")
        second.send("<iq type='get' id='alive'><ping xmlns='urn:xmpp:ping'/></iq>")
        let reply6 = try await expectIQ(second, id: "alive")

        XCTAssertEqual(reply6[attribute: "type"], "result")
        await second.close()
    }

    func testTenSessionsPerUserAndServerGeneratedResources() async throws {
        var sessions: [TestClient] = []
        for _ in 0..<10 { sessions.append(try await login("bob", tls: .direct)) }
        XCTAssertEqual(Set(sessions.compactMap { $0.boundJID }).count, 10, "server-generated resources are distinct")
        let extra = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        try await extra.openStream()
        try await extra.authenticate(username: "bob", password: "bob-secret", mechanism: "SCRAM-SHA-256")
        extra.send("<iq type='set' id='bind-11'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>eleventh</resource></bind></iq>")
        let reply7 = try await extra.nextElement()

        XCTAssertEqual(stanzaErrorCondition(reply7), "resource-constraint")

        let (status, users) = try server.ctl(["connected-users"])
        XCTAssertEqual(status, 0, users)
        XCTAssertEqual(users.split(separator: "\n").filter { $0.hasPrefix("bob@localhost/") }.count, 10, users)
        let (statusCode, statusText) = try server.ctl(["status"])
        XCTAssertEqual(statusCode, 0, statusText)
        XCTAssertTrue(statusText.contains("\"ok\":true"), statusText)
        for session in sessions { await session.close() }
        await extra.close()
    }
}

/// Builds a SCRAM client with arbitrary channel-binding data (what a MITM would have).
import StarlingSASL
enum StarlingSASLShim {
    static func client(username: String, password: String, bindingData: [UInt8]) -> SCRAMClient {
        SCRAMClient(hash: .sha256, username: username, password: password,
                    channelBinding: ChannelBinding(type: "tls-server-end-point", data: bindingData))
    }
}

