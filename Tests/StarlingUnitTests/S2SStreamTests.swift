import StarlingAPI
import StarlingS2S
import StarlingXML
import XCTest

/// The s2s state machines talking to each other through real parsers, with no network: an originating
/// server's outgoing stream against a receiving server's incoming one, and for dialback a second
/// outgoing stream to the originating server's authoritative side.
final class S2SStreamTests: XCTestCase {
    let secret = DialbackKeys(secret: Array("a shared dialback secret".utf8))

    func settings(serving domains: Set<String>, requireTLS: Bool = true, dialback: Bool = true) -> S2SStreamSettings {
        S2SStreamSettings(defaultDomain: domains.sorted()[0], requireTLS: requireTLS, dialback: dialback) { domains.contains($0) }
    }

    /// One connection: both machines, a parser each, and what crossed it.
    struct Connection {
        var outgoing: S2SOutgoingMachine
        var incoming: S2SIncomingMachine
        let toIncoming = XMLStreamParser()
        let toOutgoing = XMLStreamParser()
        var transcript = ""
        var outgoingReady: String?
        var outgoingFailure: S2SFailure?
        var verification: DialbackOutcome?
        var incomingAuthenticated: [DomainPair] = []
        var delivered: [XMLElement] = []
        /// Stanzas the receiving server sent back on a bidirectional stream (XEP-0288).
        var deliveredBack: [XMLElement] = []
        var bidirectional: [DomainPair] = []
        var dialbackRequests: [DialbackRequest] = []
        var closed = false
        /// What the incoming side learns of the peer's certificate once TLS is up.
        var peerIdentity: PeerIdentity?
        /// Whether the receiving server's certificate verified, as the outgoing side sees it.
        var receiverVerified = false

        /// Carries out the actions, then puts what they sent on the wire (a peer reads it only afterwards, as over a network).
        mutating func run(_ actions: [S2SOutgoingMachine.Action]) {
            var pendingTLS = false
            var sent = ""
            for action in actions {
                switch action {
                case .send(let text):
                    transcript += text
                    sent += text
                case .startTLS:
                    pendingTLS = true
                case .resetParser:
                    toOutgoing.reset()
                case .ready(let method):
                    outgoingReady = method
                case .verified(let outcome):
                    verification = outcome
                case .deliver(let stanza):
                    deliveredBack.append(stanza)
                case .failed(let failure):
                    outgoingFailure = failure
                case .close:
                    closed = true
                }
            }
            if !sent.isEmpty { feedIncoming(sent) }
            if pendingTLS { run(outgoing.tlsEstablished(peerVerified: receiverVerified)) }
        }

        mutating func feedIncoming(_ text: String) {
            guard let events = try? toIncoming.feed(text) else { return XCTFail("incoming cannot parse \(text)") }
            for event in events { runIncoming(incoming.received(event)) }
        }

        mutating func runIncoming(_ actions: [S2SIncomingMachine.Action]) {
            var sent = ""
            for action in actions {
                switch action {
                case .send(let text):
                    transcript += text
                    sent += text
                case .startTLS:
                    toIncoming.reset()
                    incoming.peerIdentity = peerIdentity
                case .resetParser:
                    toIncoming.reset()
                case .verifyDialback(let request):
                    dialbackRequests.append(request)
                case .authenticated(let pair, _):
                    incomingAuthenticated.append(pair)
                case .deliver(let stanza):
                    delivered.append(stanza)
                case .bidirectional(let pair):
                    bidirectional.append(pair)
                case .close:
                    closed = true
                }
            }
            if !sent.isEmpty { feedOutgoing(sent) }
        }

        mutating func feedOutgoing(_ text: String) {
            guard let events = try? toOutgoing.feed(text) else { return XCTFail("outgoing cannot parse \(text)") }
            for event in events { run(outgoing.received(event)) }
        }
    }

    func connection(from local: String, to remote: String, purpose: S2SPurpose = .stanzas, identity: PeerIdentity? = nil,
                    originating: S2SStreamSettings? = nil, receiving: S2SStreamSettings? = nil) -> Connection {
        var connection = Connection(
            outgoing: S2SOutgoingMachine(pair: DomainPair(local: local, remote: remote), purpose: purpose,
                                         settings: originating ?? settings(serving: [local]), keys: secret),
            incoming: S2SIncomingMachine(settings: receiving ?? settings(serving: [remote]), keys: secret, tlsActive: false, streamIDGenerator: { "stream-1" })
        )
        connection.peerIdentity = identity
        connection.run(connection.outgoing.start())
        return connection
    }

    func testDialbackEndToEnd() {
        var stream = connection(from: "a.test", to: "b.test")
        XCTAssertTrue(stream.transcript.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"), stream.transcript)
        // b.test asks a.test's authoritative server about the key, over a stream of its own.
        XCTAssertEqual(stream.dialbackRequests.count, 1)
        let request = stream.dialbackRequests[0]
        XCTAssertEqual(request.pair, DomainPair(local: "b.test", remote: "a.test"))
        XCTAssertEqual(request.streamID, "stream-1")
        let verify = connection(from: "b.test", to: "a.test", purpose: .verify(key: request.key, streamID: request.streamID))
        XCTAssertEqual(verify.verification, .valid, verify.transcript)
        XCTAssertTrue(verify.closed)
        stream.runIncoming(stream.incoming.dialbackVerified(request, .valid))
        XCTAssertEqual(stream.outgoingReady, "dialback")
        XCTAssertEqual(stream.incomingAuthenticated, [DomainPair(local: "b.test", remote: "a.test")])
        XCTAssertTrue(stream.outgoing.isReady)

        // Stanzas flow, and a stanza from a domain that did not authenticate ends the stream.
        stream.feedIncoming("<message from='alice@a.test/x' to='bob@b.test' type='chat'><body>hi</body></message>")
        XCTAssertEqual(stream.delivered.first?.child("body")?.text, "hi")
        stream.feedIncoming("<message from='mallory@c.test' to='bob@b.test'><body>spoofed</body></message>")
        XCTAssertEqual(stream.delivered.count, 1)
        XCTAssertTrue(stream.transcript.contains("<invalid-from xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"), stream.transcript)
        XCTAssertTrue(stream.closed)
        XCTAssertTrue(stream.incoming.isClosed)
    }

    func testBidirectionalStreams() {
        var stream = connection(from: "a.test", to: "b.test", identity: PeerIdentity(names: ["a.test"]))
        XCTAssertTrue(stream.transcript.contains("<bidi xmlns='urn:xmpp:features:bidi'/>"), stream.transcript)
        XCTAssertTrue(stream.transcript.contains("<bidi xmlns='urn:xmpp:bidi'/>"), stream.transcript)
        XCTAssertEqual(stream.bidirectional, [DomainPair(local: "b.test", remote: "a.test")])
        XCTAssertTrue(stream.outgoing.bidirectional)
        // b.test's stanzas come back on the stream a.test opened; one from a third domain ends it.
        stream.feedOutgoing("<message from='bob@b.test/desk' to='alice@a.test' type='chat'><body>back</body></message>")
        XCTAssertEqual(stream.deliveredBack.first?.child("body")?.text, "back")
        stream.feedOutgoing("<message from='mallory@c.test' to='alice@a.test'><body>no</body></message>")
        XCTAssertEqual(stream.deliveredBack.count, 1)
        XCTAssertEqual(stream.outgoingFailure?.condition, .remoteServerNotFound)
        // Without it on either side, nothing comes back.
        var plain = connection(from: "a.test", to: "b.test", identity: PeerIdentity(names: ["a.test"]),
                               receiving: { var settings = settings(serving: ["b.test"]); settings.bidi = false; return settings }())
        XCTAssertFalse(plain.transcript.contains("urn:xmpp:bidi"), plain.transcript)
        XCTAssertTrue(plain.bidirectional.isEmpty)
        plain.feedOutgoing("<message from='bob@b.test/desk' to='alice@a.test'><body>back</body></message>")
        XCTAssertTrue(plain.deliveredBack.isEmpty)
        XCTAssertNotNil(plain.outgoingFailure)
    }

    func testAForgedKeyIsInvalid() {
        var stream = connection(from: "a.test", to: "b.test")
        let request = stream.dialbackRequests[0]
        // The authoritative server did not give out this key.
        let verify = connection(from: "b.test", to: "a.test", purpose: .verify(key: String(repeating: "0", count: 64), streamID: request.streamID))
        XCTAssertEqual(verify.verification, .invalid)
        stream.runIncoming(stream.incoming.dialbackVerified(request, .invalid))
        XCTAssertNil(stream.outgoingReady)
        XCTAssertTrue(stream.transcript.contains("type='invalid'"), stream.transcript)
        XCTAssertNotNil(stream.outgoingFailure)
        XCTAssertEqual(stream.outgoingFailure?.condition, .remoteServerNotFound)
        // Keys are bound to the stream id and the domain pair.
        let key = secret.key(receiving: "b.test", originating: "a.test", streamID: "stream-1")
        XCTAssertTrue(secret.verify(key, receiving: "b.test", originating: "a.test", streamID: "stream-1"))
        XCTAssertFalse(secret.verify(key, receiving: "b.test", originating: "a.test", streamID: "stream-2"))
        XCTAssertFalse(secret.verify(key, receiving: "c.test", originating: "a.test", streamID: "stream-1"))
        XCTAssertFalse(DialbackKeys(secret: Array("another secret".utf8)).verify(key, receiving: "b.test", originating: "a.test", streamID: "stream-1"))
    }

    func testSASLExternalWhenTheCertificateCoversTheDomain() {
        let stream = connection(from: "a.test", to: "b.test", identity: PeerIdentity(names: ["*.test"]))
        XCTAssertEqual(stream.outgoingReady, "SASL EXTERNAL", stream.transcript)
        XCTAssertTrue(stream.dialbackRequests.isEmpty)
        XCTAssertEqual(stream.incomingAuthenticated, [DomainPair(local: "b.test", remote: "a.test")])
        XCTAssertTrue(stream.transcript.contains("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>YS50ZXN0</auth>"), stream.transcript)
    }

    func testACertificateForAnotherDomainFallsBackToDialback() {
        let stream = connection(from: "a.test", to: "b.test", identity: PeerIdentity(names: ["c.test"]))
        XCTAssertFalse(stream.transcript.contains("EXTERNAL"), stream.transcript)
        XCTAssertEqual(stream.dialbackRequests.count, 1)
        // Without dialback on the receiving side, nothing is left to authenticate with.
        let strict = connection(from: "a.test", to: "b.test", identity: PeerIdentity(names: ["c.test"]),
                                receiving: settings(serving: ["b.test"], dialback: false))
        XCTAssertEqual(strict.outgoingFailure?.condition, .remoteServerNotFound)
        XCTAssertTrue(strict.closed)
    }

    func testWithoutDialbackBothSidesNeedVerifiedCertificates() {
        let strict = settings(serving: ["a.test"], dialback: false)
        // The receiving server's certificate does not verify: the originating server gives up after TLS.
        let unverified = connection(from: "a.test", to: "b.test", identity: PeerIdentity(names: ["a.test"]), originating: strict,
                                    receiving: settings(serving: ["b.test"], dialback: false))
        XCTAssertEqual(unverified.outgoingFailure?.condition, .remoteServerNotFound)
        XCTAssertTrue(unverified.outgoingFailure?.reason.contains("does not verify") == true, "\(String(describing: unverified.outgoingFailure))")
        // Both verify: SASL EXTERNAL, no dialback anywhere.
        var verified = Connection(
            outgoing: S2SOutgoingMachine(pair: DomainPair(local: "a.test", remote: "b.test"), purpose: .stanzas, settings: strict, keys: secret),
            incoming: S2SIncomingMachine(settings: settings(serving: ["b.test"], dialback: false), keys: secret, tlsActive: false)
        )
        verified.peerIdentity = PeerIdentity(names: ["a.test"])
        verified.receiverVerified = true
        verified.run(verified.outgoing.start())
        XCTAssertEqual(verified.outgoingReady, "SASL EXTERNAL", verified.transcript)
        XCTAssertFalse(verified.transcript.contains("<db:") || verified.transcript.contains(DialbackNamespace.feature), verified.transcript)
    }

    func testTLSIsRequiredBeforeDialback() {
        // A receiving server that offers no TLS: an originating server that requires it gives up.
        var outgoing = S2SOutgoingMachine(pair: DomainPair(local: "a.test", remote: "b.test"), purpose: .stanzas, settings: settings(serving: ["a.test"]), keys: secret)
        _ = outgoing.start()
        let wire = XMLStreamParser()
        var failed: S2SFailure?
        for event in try! wire.feed("<stream:stream xmlns='jabber:server' xmlns:stream='\(Namespace.stream)' id='x' from='b.test' version='1.0'><stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>") {
            for case .failed(let failure) in outgoing.received(event) { failed = failure }
        }
        XCTAssertEqual(failed?.condition, .remoteServerNotFound)
        XCTAssertFalse(outgoing.isReady)
        // And an incoming stream that requires TLS refuses dialback without it.
        var incoming = S2SIncomingMachine(settings: settings(serving: ["b.test"]), keys: secret, tlsActive: false)
        var header = XMLElement(name: "stream", namespace: Namespace.stream, attributes: ["to": "b.test", "from": "a.test", "version": "1.0"])
        header.prefix = "stream"
        _ = incoming.streamOpened(header: header, defaultNamespace: Namespace.server)
        let parser = XMLStreamParser()
        let events = try! parser.feed("<stream:stream xmlns='jabber:server' xmlns:stream='\(Namespace.stream)' xmlns:db='jabber:server:dialback'><db:result from='a.test' to='b.test'>abc</db:result>")
        guard case .stanza(let result) = events.last else { return XCTFail("no element") }
        let actions = incoming.elementReceived(result)
        XCTAssertTrue(actions.contains(.close))
        XCTAssertTrue(actions.contains { if case .send(let text) = $0 { return text.contains("policy-violation") } else { return false } })
    }

    func testUnknownTargetsAndUnauthenticatedStanzas() {
        var incoming = S2SIncomingMachine(settings: settings(serving: ["b.test"]), keys: secret, tlsActive: true)
        var header = XMLElement(name: "stream", namespace: Namespace.stream, attributes: ["to": "elsewhere.test", "from": "a.test", "version": "1.0"])
        header.prefix = "stream"
        let refused = incoming.streamOpened(header: header, defaultNamespace: Namespace.server)
        XCTAssertTrue(refused.contains { if case .send(let text) = $0 { return text.contains("host-unknown") } else { return false } })

        var fresh = S2SIncomingMachine(settings: settings(serving: ["b.test"]), keys: secret, tlsActive: true)
        header[attribute: "to"] = "b.test"
        _ = fresh.streamOpened(header: header, defaultNamespace: Namespace.server)
        let stanza = XMLElement(name: "message", namespace: Namespace.server, attributes: ["from": "alice@a.test", "to": "bob@b.test"])
        let actions = fresh.elementReceived(stanza)
        XCTAssertTrue(actions.contains { if case .send(let text) = $0 { return text.contains("not-authorized") } else { return false } })
        XCTAssertFalse(actions.contains { if case .deliver = $0 { return true } else { return false } })
    }

    func testWildcardNamesCoverOneLabel() {
        let identity = PeerIdentity(names: ["*.Example.test", "exact.test"])
        XCTAssertTrue(identity.covers("chat.example.test"))
        XCTAssertFalse(identity.covers("a.chat.example.test"))
        XCTAssertFalse(identity.covers("example.test"))
        XCTAssertTrue(identity.covers("EXACT.test"))
        XCTAssertFalse(identity.covers("other.test"))
    }

    func testNamespacesMoveBetweenClientAndServer() {
        var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["to": "bob@b.test"])
        message.append(XMLElement(name: "body", namespace: Namespace.client).with(text: "hi"))
        message.append(XMLElement(name: "x", namespace: "jabber:x:oob"))
        let wire = message.movingNamespace(Namespace.client, to: Namespace.server)
        XCTAssertEqual(wire.serialized(inheritedNamespace: Namespace.server), "<message to='bob@b.test'><body>hi</body><x xmlns='jabber:x:oob'/></message>")
        XCTAssertEqual(wire.movingNamespace(Namespace.server, to: Namespace.client), message)
    }
}
