import Foundation
import StarlingAPI
import StarlingFAST
import StarlingSASL
@testable import StarlingServer
import StarlingXML
import XCTest

/// The c2s protocol driven event by event, with no network.
final class C2SStateMachineTests: XCTestCase {
    let settings = C2SSettings(hosts: ["example.com"], defaultHost: "example.com",
                               mechanisms: ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"], tlsRequired: true, offersStartTLS: true)
    let binding = ChannelBinding(type: "tls-server-end-point", data: Array(repeating: 42, count: 32))

    func header(to: String = "example.com", namespace: String = Namespace.client, version: String? = "1.0") -> (XMLElement, String?) {
        var header = XMLElement(name: "stream", namespace: Namespace.stream)
        header.prefix = "stream"
        header[attribute: "to"] = to
        if let version { header[attribute: "version"] = version }
        return (header, namespace)
    }

    func element(_ xml: String) -> XMLElement {
        let parser = XMLStreamParser()
        let events = try! parser.feed("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>" + xml)
        guard case .stanza(let element) = events.last! else { fatalError("no element in \(xml)") }
        return element
    }

    func sentText(_ actions: [C2SStateMachine.Action]) -> String {
        actions.map { action -> String in
            switch action {
            case .send(let text): return text
            case .sendElement(let element): return element.serialized(inheritedNamespace: Namespace.client)
            case .bind2Bound(let success, _): return success.serialized(inheritedNamespace: Namespace.client)
            default: return ""
            }
        }.joined()
    }

    func streamErrorCondition(_ actions: [C2SStateMachine.Action]) -> String? {
        let text = sentText(actions)
        guard let range = text.range(of: "<stream:error><") else { return nil }
        return String(text[range.upperBound...].prefix { $0 != " " && $0 != "/" })
    }

    /// Drives a machine through STARTTLS, returning it ready for SASL.
    func machineAfterTLS() -> C2SStateMachine {
        var machine = C2SStateMachine(settings: settings, tlsActive: false, streamID: { "s1" })
        let (h, ns) = header()
        _ = machine.streamOpened(header: h, defaultNamespace: ns)
        XCTAssertEqual(machine.elementReceived(element("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")).last, .startTLS)
        XCTAssertEqual(machine.tlsEstablished(channelBinding: binding), [.resetParser])
        _ = machine.streamOpened(header: h, defaultNamespace: ns)
        return machine
    }

    func testFeaturesBeforeAndAfterTLS() {
        var machine = C2SStateMachine(settings: settings, tlsActive: false, streamID: { "s1" })
        let (h, ns) = header()
        let before = sentText(machine.streamOpened(header: h, defaultNamespace: ns))
        XCTAssertTrue(before.hasPrefix("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='example.com' version='1.0'"), before)
        XCTAssertTrue(before.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"), before)
        XCTAssertFalse(before.contains("mechanisms"), "no SASL before TLS when TLS is required")

        let proceed = machine.elementReceived(element("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"))
        XCTAssertEqual(sentText(proceed), "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        XCTAssertEqual(machine.tlsEstablished(channelBinding: binding), [.resetParser])
        let after = sentText(machine.streamOpened(header: h, defaultNamespace: ns))
        XCTAssertFalse(after.contains("starttls"))
        XCTAssertTrue(after.contains("<mechanism>SCRAM-SHA-256-PLUS</mechanism><mechanism>SCRAM-SHA-256</mechanism><mechanism>PLAIN</mechanism>"), after)
        XCTAssertTrue(after.contains("<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'><channel-binding type='tls-server-end-point'/></sasl-channel-binding>"), after)
    }

    /// XEP-0388 SASL2 with XEP-0386 Bind2: offered next to SASL, answered in its own namespace, no stream
    /// restart, and the success waits for the resource and names it.
    func testSASL2WithBind2() throws {
        var machine = machineAfterTLS()
        let (h, ns) = header()
        var probe = C2SStateMachine(settings: settings, tlsActive: true, channelBinding: binding, streamID: { "s1" })
        let features = sentText(probe.streamOpened(header: h, defaultNamespace: ns))
        XCTAssertTrue(features.contains("<authentication xmlns='urn:xmpp:sasl:2'><mechanism>SCRAM-SHA-256-PLUS</mechanism><mechanism>SCRAM-SHA-256</mechanism>"
                                        + "<mechanism>PLAIN</mechanism><inline><bind xmlns='urn:xmpp:bind:0'/></inline></authentication>"), features)

        let wrong = Data("\u{0}juliet\u{0}wrong".utf8).base64EncodedString()
        let authenticate = "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>%@</initial-response><user-agent id='u1'/>"
            + "<bind xmlns='urn:xmpp:bind:0'><tag>Phone</tag></bind></authenticate>"
        XCTAssertEqual(machine.elementReceived(element(authenticate.replacingOccurrences(of: "%@", with: wrong))),
                       [.verifyPlain(username: "juliet", host: "example.com", password: "wrong")])
        guard case .authenticationFailed(let reply)? = machine.plainVerified(username: "juliet", success: false).first else { return XCTFail("no failure") }
        XCTAssertEqual(reply.serialized(), "<failure xmlns='urn:xmpp:sasl:2'><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>")

        let right = Data("\u{0}juliet\u{0}r0meo".utf8).base64EncodedString()
        _ = machine.elementReceived(element(authenticate.replacingOccurrences(of: "%@", with: right)))
        let user = JID("juliet@example.com")!
        let actions = machine.plainVerified(username: "juliet", success: true)
        XCTAssertEqual(actions.first, .authenticated(user))
        guard case .bindResource(user, let requested?, let iq)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertTrue(requested.hasPrefix("Phone."), requested)
        XCTAssertFalse(actions.contains(.resetParser), "SASL2 keeps the stream")
        let bound = JID("juliet@example.com/\(requested)")!
        XCTAssertEqual(sentText(machine.resourceBound(bound, iq: iq)),
                       "<success xmlns='urn:xmpp:sasl:2'><authorization-identifier>\(bound)</authorization-identifier><bound xmlns='urn:xmpp:bind:0'/></success>")
        XCTAssertEqual(machine.boundJID, bound)
        XCTAssertEqual(machine.elementReceived(element("<message to='romeo@example.com'><body>hi</body></message>")).count, 1)
    }

    /// XEP-0386 §5: what the host can enable inline is advertised, and what the client asks of it (and only
    /// that) is handed over with the bound resource.
    func testBind2InlineFeatures() throws {
        var inlineSettings = settings
        inlineSettings.bind2Inline["example.com"] = ["urn:xmpp:sm:3", "urn:xmpp:carbons:2"]
        var machine = C2SStateMachine(settings: inlineSettings, tlsActive: true, channelBinding: binding, streamID: { "s1" })
        let (h, ns) = header()
        let features = sentText(machine.streamOpened(header: h, defaultNamespace: ns))
        XCTAssertTrue(features.contains("<inline><bind xmlns='urn:xmpp:bind:0'><inline><feature var='urn:xmpp:sm:3'/><feature var='urn:xmpp:carbons:2'/></inline></bind></inline>"), features)
        let plain = Data("\u{0}juliet\u{0}r0meo".utf8).base64EncodedString()
        _ = machine.elementReceived(element("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>\(plain)</initial-response>"
            + "<bind xmlns='urn:xmpp:bind:0'><tag>Phone</tag><enable xmlns='urn:xmpp:sm:3' resume='true'/><enable xmlns='urn:xmpp:carbons:2'/>"
            + "<inactive xmlns='urn:xmpp:csi:0'/></bind></authenticate>"))
        guard case .bindResource(_, _, let iq)? = machine.plainVerified(username: "juliet", success: true).last else { return XCTFail("no bind") }
        guard case .bind2Bound(let success, let inline)? = machine.resourceBound(JID("juliet@example.com/Phone.1")!, iq: iq).first else { return XCTFail("no success") }
        XCTAssertNotNil(success.child("bound", namespace: "urn:xmpp:bind:0"))
        // CSI was not advertised here: left out.
        XCTAssertEqual(inline.map(\.namespace), ["urn:xmpp:sm:3", "urn:xmpp:carbons:2"])
    }

    /// XEP-0484: FAST is advertised inside SASL2 over TLS (ENDP only with the certificate binding); a password
    /// login asking for a token waits for it and carries it in `<success/>`; a token login is one message whose
    /// proof the handler checks, with the channel binding for ENDP and the invalidate flag passed on.
    func testFASTTokenRequestAndTokenLogin() throws {
        var fastSettings = settings
        fastSettings.fastMechanisms = ["HT-SHA-256-ENDP", "HT-SHA-256-NONE"]
        var plainText = C2SStateMachine(settings: fastSettings, tlsActive: false, streamID: { "s1" })
        let (h, ns) = header()
        XCTAssertFalse(sentText(plainText.streamOpened(header: h, defaultNamespace: ns)).contains("urn:xmpp:fast:0"), "no FAST before TLS")
        var withoutBinding = C2SStateMachine(settings: fastSettings, tlsActive: true, streamID: { "s1" })
        XCTAssertTrue(sentText(withoutBinding.streamOpened(header: h, defaultNamespace: ns))
            .contains("<fast xmlns='urn:xmpp:fast:0'><mechanism>HT-SHA-256-NONE</mechanism></fast>"), "ENDP needs the certificate binding")

        var machine = C2SStateMachine(settings: fastSettings, tlsActive: true, channelBinding: binding, streamID: { "s1" })
        XCTAssertTrue(sentText(machine.streamOpened(header: h, defaultNamespace: ns))
            .contains("<fast xmlns='urn:xmpp:fast:0'><mechanism>HT-SHA-256-ENDP</mechanism><mechanism>HT-SHA-256-NONE</mechanism></fast>"))
        let agent = "<user-agent id='phone-1'><software>Talk</software><device>Pixel</device></user-agent>"
        let plain = Data("\u{0}juliet\u{0}r0meo".utf8).base64EncodedString()
        _ = machine.elementReceived(element("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>\(plain)</initial-response>"
            + agent + "<request-token xmlns='urn:xmpp:fast:0' mechanism='HT-SHA-256-ENDP'/></authenticate>"))
        let juliet = JID("juliet@example.com")!
        XCTAssertEqual(machine.plainVerified(username: "juliet", success: true),
                       [.authenticated(juliet), .issueToken(FASTIssue(user: juliet, client: "phone-1", mechanism: "HT-SHA-256-ENDP", software: "Talk", device: "Pixel"))])
        XCTAssertEqual(sentText(machine.tokenIssued(IssuedFASTToken(token: "fast-abc", expiresAt: 1_800_000_000))),
                       "<success xmlns='urn:xmpp:sasl:2'><authorization-identifier>juliet@example.com</authorization-identifier>"
                       + "<token xmlns='urn:xmpp:fast:0' expiry='2027-01-15T08:00:00Z' token='fast-abc'/></success>")

        // The token login: one message, the proof bound to the certificate, a rotation issued for the same mechanism.
        var again = C2SStateMachine(settings: fastSettings, tlsActive: true, channelBinding: binding, streamID: { "s2" })
        _ = again.streamOpened(header: h, defaultNamespace: ns)
        let initial = HashedTokenMechanism.initialResponse(username: "juliet", token: "fast-abc", channelBinding: binding.data)
        let proof = HashedTokenMechanism.initiatorProof(token: "fast-abc", channelBinding: binding.data)
        XCTAssertEqual(again.elementReceived(element("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='HT-SHA-256-ENDP'><initial-response>"
            + Data(initial).base64EncodedString() + "</initial-response>" + agent + "<fast xmlns='urn:xmpp:fast:0'/>"
            + "<bind xmlns='urn:xmpp:bind:0'><tag>Talk</tag></bind></authenticate>")),
            [.verifyToken(FASTVerification(user: juliet, client: "phone-1", mechanism: "HT-SHA-256-ENDP", proof: proof, channelBinding: binding.data, invalidate: false))])
        XCTAssertEqual(again.tokenVerified(.success(responderProof: [1, 2, 3], rotate: true)),
                       [.authenticated(juliet), .issueToken(FASTIssue(user: juliet, client: "phone-1", mechanism: "HT-SHA-256-ENDP", software: "Talk", device: "Pixel"))])
        guard case .bindResource(_, _, let iq)? = again.tokenIssued(IssuedFASTToken(token: "fast-def", expiresAt: 1_800_000_000)).last else {
            return XCTFail("Bind2 binds after the token is stored")
        }
        let success = sentText(again.resourceBound(JID("juliet@example.com/Talk.1")!, iq: iq))
        XCTAssertTrue(success.contains("<additional-data>AQID</additional-data>") && success.contains("token='fast-def'") && success.contains("<bound"), success)

        // Logging the token out: no rotation; without a user-agent id there is nothing to look up.
        var logout = C2SStateMachine(settings: fastSettings, tlsActive: true, channelBinding: binding, streamID: { "s3" })
        _ = logout.streamOpened(header: h, defaultNamespace: ns)
        let none = HashedTokenMechanism.initialResponse(username: "juliet", token: "fast-def", channelBinding: [])
        let request = "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='HT-SHA-256-NONE'><initial-response>" + Data(none).base64EncodedString() + "</initial-response>"
        guard case .verifyToken(let verification)? = logout.elementReceived(element(request + agent + "<fast xmlns='urn:xmpp:fast:0' invalidate='true'/></authenticate>")).first else {
            return XCTFail("no verification")
        }
        XCTAssertEqual(verification.channelBinding, [], "NONE carries no binding")
        XCTAssertTrue(verification.invalidate)
        XCTAssertEqual(logout.tokenVerified(.success(responderProof: [9], rotate: true)).first, .authenticated(juliet))
        var anonymous = C2SStateMachine(settings: fastSettings, tlsActive: true, channelBinding: binding, streamID: { "s4" })
        _ = anonymous.streamOpened(header: h, defaultNamespace: ns)
        XCTAssertEqual(sentText(anonymous.elementReceived(element(request + "</authenticate>"))),
                       "<failure xmlns='urn:xmpp:sasl:2'><malformed-request xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>")
        // A wrong or expired token fails in SASL2's words; a wrong one counts as a failed login.
        _ = anonymous.elementReceived(element(request + agent + "<fast xmlns='urn:xmpp:fast:0'/></authenticate>"))
        guard case .authenticationFailed(let reply)? = anonymous.tokenVerified(.failure(.notAuthorized)).first else { return XCTFail("not counted") }
        XCTAssertEqual(reply.serialized(inheritedNamespace: Namespace.client),
                       "<failure xmlns='urn:xmpp:sasl:2'><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>")
        _ = anonymous.elementReceived(element(request + agent + "<fast xmlns='urn:xmpp:fast:0'/></authenticate>"))
        XCTAssertEqual(sentText(anonymous.tokenVerified(.failure(.credentialsExpired))),
                       "<failure xmlns='urn:xmpp:sasl:2'><credentials-expired xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>")
        // HT mechanisms exist only inside SASL2.
        XCTAssertEqual(sentText(anonymous.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='HT-SHA-256-NONE'>"
            + Data(none).base64EncodedString() + "</auth>"))),
                       "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><invalid-mechanism/></failure>")
    }

    /// SASL2 without Bind2: the success names the account, and the client binds as RFC 6120 says, unrestarted.
    func testSASL2ThenClassicBind() throws {
        var machine = machineAfterTLS()
        let plain = Data("\u{0}juliet\u{0}r0meo".utf8).base64EncodedString()
        _ = machine.elementReceived(element("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>\(plain)</initial-response></authenticate>"))
        XCTAssertEqual(sentText(machine.plainVerified(username: "juliet", success: true)),
                       "<success xmlns='urn:xmpp:sasl:2'><authorization-identifier>juliet@example.com</authorization-identifier></success>")
        let bind = element("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>desk</resource></bind></iq>")
        XCTAssertEqual(machine.elementReceived(bind), [.bindResource(user: JID("juliet@example.com")!, requested: "desk", iq: bind)])
        // An unknown mechanism is refused in SASL2's words.
        var other = machineAfterTLS()
        XCTAssertEqual(sentText(other.elementReceived(element("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='DIGEST-MD5'/>"))),
                       "<failure xmlns='urn:xmpp:sasl:2'><invalid-mechanism xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>")
    }

    /// RFC 6120 §6.4.2: SASL data is base64, which may be broken over lines; "=" is an empty response.
    func testSASLDataIgnoresXMLWhitespaceAndRejectsTheRest() throws {
        let plain = Data("\u{0}juliet\u{0}r0meo".utf8).base64EncodedString()
        let wrapped = plain.enumerated().map { $0.offset > 0 && $0.offset % 4 == 0 ? "\r\n\t \($0.element)" : String($0.element) }.joined()
        var machine = machineAfterTLS()
        XCTAssertEqual(machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\n\(wrapped)\n</auth>")),
                       [.verifyPlain(username: "juliet", host: "example.com", password: "r0meo")])
        machine = machineAfterTLS()
        XCTAssertTrue(sentText(machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(plain)\u{00A0}</auth>")))
            .contains("<incorrect-encoding"), "a no-break space is not XML whitespace")
        machine = machineAfterTLS()
        XCTAssertTrue(sentText(machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>=</auth>")))
            .contains("<malformed-request"), "an empty PLAIN message")
    }

    /// XEP-0198: after authentication, `<resume/>` takes the place of bind; a failed resumption leaves
    /// binding open, and enabling before a resource is bound is refused.
    func testResumeInsteadOfBind() throws {
        var machine = machineAfterTLS()
        let plain = Data("\u{0}juliet\u{0}r0meo".utf8).base64EncodedString()
        XCTAssertEqual(machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(plain)</auth>")),
                       [.verifyPlain(username: "juliet", host: "example.com", password: "r0meo")])
        XCTAssertEqual(Array(machine.plainVerified(username: "juliet", success: true).dropFirst()), [.authenticated(JID("juliet@example.com")!), .resetParser])
        let (h, ns) = header()
        XCTAssertTrue(sentText(machine.streamOpened(header: h, defaultNamespace: ns)).contains("<bind"))
        let user = JID("juliet@example.com")!

        XCTAssertEqual(machine.elementReceived(element("<enable xmlns='urn:xmpp:sm:3'/>")), [.sendElement(StreamManagement.failed(.unexpectedRequest))])
        XCTAssertEqual(machine.elementReceived(element("<resume xmlns='urn:xmpp:sm:3' previd='abc'/>")), [.sendElement(StreamManagement.failed(.badRequest))],
                       "a resumption needs h")
        XCTAssertEqual(machine.elementReceived(element("<resume xmlns='urn:xmpp:sm:3' previd='abc' h='7'/>")), [.resumeSession(user: user, previd: "abc", h: 7)])
        XCTAssertEqual(sentText(machine.resumeFailed()), "<failed xmlns='urn:xmpp:sm:3'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>")
        XCTAssertEqual(machine.elementReceived(element("<resume xmlns='urn:xmpp:sm:3' previd='abc' h='7'/>")), [.resumeSession(user: user, previd: "abc", h: 7)])
        let full = JID("juliet@example.com/balcony")!
        XCTAssertEqual(machine.resumed(full), [])
        XCTAssertEqual(machine.boundJID, full)
        guard case .route = machine.elementReceived(element("<message to='romeo@example.com'><body>back</body></message>")).first else {
            return XCTFail("stanzas flow once resumed")
        }
    }

    func testSCRAMPlusThenBindThenStanzas() throws {
        var machine = machineAfterTLS()
        var client = SCRAMClient(hash: .sha256, username: "Juliet", password: "r0meo", channelBinding: binding)
        let auth = machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256-PLUS'>\(Data(client.clientFirst()).base64EncodedString())</auth>"))
        XCTAssertEqual(auth, [.lookUpCredentials(username: "juliet", host: "example.com")], "the username is prepared as a localpart")
        let stored = SCRAMCredentials.derive(password: "r0meo", hash: .sha256, salt: [9, 9, 9], iterations: 4096)
        guard case .sendElement(let challenge) = machine.credentialsLoaded([stored]).first else { return XCTFail() }
        let final = try client.clientFinal(serverFirst: Array(Data(base64Encoded: challenge.text)!))
        let success = machine.elementReceived(element("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\(Data(final).base64EncodedString())</response>"))
        guard case .sendElement(let successElement) = success.first else { return XCTFail() }
        XCTAssertEqual(successElement.name, "success")
        try client.verify(serverFinal: Array(Data(base64Encoded: successElement.text)!))
        XCTAssertEqual(Array(success.dropFirst()), [.authenticated(JID("juliet@example.com")!), .resetParser])

        let (h, ns) = header()
        let features = sentText(machine.streamOpened(header: h, defaultNamespace: ns))
        XCTAssertTrue(features.contains("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"), features)

        let bindIQ = element("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>balcony</resource></bind></iq>")
        XCTAssertEqual(machine.elementReceived(bindIQ), [.bindResource(user: JID("juliet@example.com")!, requested: "balcony", iq: bindIQ)])
        let full = JID("juliet@example.com/balcony")!
        XCTAssertEqual(sentText(machine.resourceBound(full, iq: bindIQ)),
                       "<iq id='b' type='result'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>juliet@example.com/balcony</jid></bind></iq>")

        let routed = machine.elementReceived(element("<message to='romeo@example.com'><body>hi</body></message>"))
        guard case .route(let stamped) = routed.first else { return XCTFail("\(routed)") }
        XCTAssertEqual(stamped[attribute: "from"], "juliet@example.com/balcony")

        XCTAssertEqual(streamErrorCondition(machine.elementReceived(element("<message from='romeo@example.com/x' to='a@example.com'/>"))), "invalid-from")
        XCTAssertTrue(machine.isClosed)
    }

    func testWrongPasswordIsDelayedAndRetryAllowed() throws {
        var machine = machineAfterTLS()
        var client = SCRAMClient(hash: .sha256, username: "juliet", password: "wrong")
        _ = machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>\(Data(client.clientFirst()).base64EncodedString())</auth>"))
        let stored = SCRAMCredentials.derive(password: "r0meo", hash: .sha256, salt: [1], iterations: 4096)
        guard case .sendElement(let challenge) = machine.credentialsLoaded([stored]).first else { return XCTFail() }
        let final = try client.clientFinal(serverFirst: Array(Data(base64Encoded: challenge.text)!))
        let failed = machine.elementReceived(element("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\(Data(final).base64EncodedString())</response>"))
        guard case .authenticationFailed(let reply) = failed.first else { return XCTFail("\(failed)") }
        XCTAssertEqual(reply.serialized(), "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>")
        // The client may try again on the same stream.
        let plain = machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(Data("\0juliet\0r0meo".utf8).base64EncodedString())</auth>"))
        XCTAssertEqual(plain, [.verifyPlain(username: "juliet", host: "example.com", password: "r0meo")])
        XCTAssertEqual(machine.plainVerified(username: "juliet", success: true).last, .resetParser)
    }

    func testTooManyAttemptsClosesTheStream() {
        var machine = machineAfterTLS()
        for _ in 0..<settings.maxSASLAttempts {
            _ = machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='NOPE'/>"))
        }
        XCTAssertEqual(streamErrorCondition(machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='NOPE'/>"))), "policy-violation")
    }

    func testAuthzidForSomeoneElse() {
        var machine = machineAfterTLS()
        let plain = machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(Data("romeo@example.com\0juliet\0r0meo".utf8).base64EncodedString())</auth>"))
        guard case .authenticationFailed(let reply) = plain.first else { return XCTFail("\(plain)") }
        XCTAssertEqual(reply.elements.first?.name, "invalid-authzid")
    }

    func testBadHeaders() {
        var unknownHost = C2SStateMachine(settings: settings, tlsActive: false)
        let (h1, ns1) = header(to: "elsewhere.org")
        XCTAssertEqual(streamErrorCondition(unknownHost.streamOpened(header: h1, defaultNamespace: ns1)), "host-unknown")

        var wrongNamespace = C2SStateMachine(settings: settings, tlsActive: false)
        let (h2, _) = header()
        let actions = wrongNamespace.streamOpened(header: h2, defaultNamespace: "jabber:server")
        XCTAssertTrue(sentText(actions).hasPrefix("<?xml"), "our header comes before the error")
        XCTAssertEqual(streamErrorCondition(actions), "invalid-namespace")
        XCTAssertEqual(actions.last, .close)

        var oldVersion = C2SStateMachine(settings: settings, tlsActive: false)
        let (h3, ns3) = header(version: nil)
        XCTAssertEqual(streamErrorCondition(oldVersion.streamOpened(header: h3, defaultNamespace: ns3)), "unsupported-version")
    }

    func testStanzasBeforeAuthenticationAndParseErrors() {
        var machine = machineAfterTLS()
        XCTAssertEqual(streamErrorCondition(machine.elementReceived(element("<message to='a@example.com'/>"))), "not-authorized")

        var plaintext = C2SStateMachine(settings: settings, tlsActive: false)
        let (h, ns) = header()
        _ = plaintext.streamOpened(header: h, defaultNamespace: ns)
        XCTAssertEqual(streamErrorCondition(plaintext.elementReceived(element("<message to='a@example.com'/>"))), "policy-violation")

        for (error, condition) in [(XMLStreamError.notWellFormed("x"), "not-well-formed"), (.restrictedXML("x"), "restricted-xml"),
                                   (.stanzaTooLarge(limit: 1), "policy-violation"), (.tooDeep(limit: 1), "policy-violation")] {
            var fresh = C2SStateMachine(settings: settings, tlsActive: false)
            let actions = fresh.parseFailed(error)
            XCTAssertEqual(streamErrorCondition(actions), condition)
            XCTAssertTrue(sentText(actions).hasPrefix("<?xml"), "a header is sent first if none was")
        }
    }

    func testIQValidationOnceBound() throws {
        var machine = machineAfterTLS()
        _ = machine.elementReceived(element("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(Data("\0juliet\0pw".utf8).base64EncodedString())</auth>"))
        _ = machine.plainVerified(username: "juliet", success: true)
        let (h, ns) = header()
        _ = machine.streamOpened(header: h, defaultNamespace: ns)
        let bindIQ = element("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        XCTAssertEqual(machine.elementReceived(bindIQ), [.bindResource(user: JID("juliet@example.com")!, requested: nil, iq: bindIQ)])
        _ = machine.resourceBound(JID("juliet@example.com/r")!, iq: bindIQ)

        XCTAssertTrue(sentText(machine.elementReceived(element("<iq type='get' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>"))).contains("<bad-request"), "no id")
        XCTAssertTrue(sentText(machine.elementReceived(element("<iq type='get' id='1' to='example.com'/>"))).contains("<bad-request"), "no payload")
        XCTAssertTrue(sentText(machine.elementReceived(element("<iq type='poke' id='2' to='example.com'><x xmlns='y'/></iq>"))).contains("<bad-request"), "bad type")
        XCTAssertTrue(sentText(machine.elementReceived(element("<message to='a@@b'/>"))).contains("<jid-malformed"))
        XCTAssertEqual(sentText(machine.elementReceived(element("<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"))),
                       "<iq id='s' to='juliet@example.com/r' type='result'/>")
        let nonza = element("<active xmlns='urn:xmpp:csi:0'/>")
        XCTAssertEqual(machine.elementReceived(nonza), [.nonza(nonza)], "non-stanzas go to the modules")
        XCTAssertEqual(streamErrorCondition(machine.elementReceived(element("<foo/>"))), "unsupported-stanza-type")
    }
}
