import Foundation
import StarlingAPI
import StarlingFAST
import StarlingSASL
import StarlingXML

/// What the client-to-server state machine needs to know about the server.
public struct C2SSettings: Sendable {
    public var hosts: Set<String>
    public var defaultHost: String
    /// Mechanisms in order of preference, from config.
    public var mechanisms: [String]
    public var tlsRequired: Bool
    /// Whether this listener offers STARTTLS (false for direct TLS, where TLS is already up).
    public var offersStartTLS: Bool
    public var maxSASLAttempts: Int
    /// PLAIN may be offered without TLS (an explicit, load-test-only choice).
    public var plainWithoutTLS = false
    /// Offer XEP-0388 SASL2 (with XEP-0386 Bind2 inline) next to RFC 6120 SASL.
    public var offersSASL2 = true
    /// Hosts whose passwords a module decides: no stored keys there, so PLAIN is the only mechanism.
    public var moduleAuthenticatedHosts: Set<String> = []
    /// Stream features modules add, per host and phase.
    public var preAuthFeatures: [String: [XMLElement]] = [:]
    /// XEP-0386 §5: per host, the namespaces of what a Bind2 request may enable inline (stream management,
    /// carbons, client state), in the order advertised.
    public var bind2Inline: [String: [String]] = [:]
    /// XEP-0484 FAST mechanisms offered inline in SASL2 (over TLS, on hosts with stored accounts); empty: no FAST.
    public var fastMechanisms: [String] = []
    public var boundFeatures: [String: [XMLElement]] = [:]

    public init(hosts: Set<String>, defaultHost: String, mechanisms: [String], tlsRequired: Bool, offersStartTLS: Bool, maxSASLAttempts: Int = 5) {
        self.hosts = hosts
        self.defaultHost = defaultHost
        self.mechanisms = mechanisms
        self.tlsRequired = tlsRequired
        self.offersStartTLS = offersStartTLS
        self.maxSASLAttempts = maxSASLAttempts
    }
}

/// How a c2s stream is carried, which decides how it opens and closes and how its elements are written.
public enum C2SFraming: Sendable, Equatable {
    /// One XML document per stream over TCP (RFC 6120): `<stream:stream>` … `</stream:stream>`.
    case stream
    /// WebSocket (RFC 7395): every message one whole element, `<open/>` and `<close/>` in
    /// `urn:ietf:params:xml:ns:xmpp-framing` instead of the stream's tags, each element namespace-complete.
    case webSocket

    /// RFC 7395's framing namespace.
    public static let namespace = "urn:ietf:params:xml:ns:xmpp-framing"
}

/// The client-to-server stream protocol (RFC 6120 §4–7) as a plain state machine: events in, actions
/// out. The NIO handler only carries the actions out, so every rule here is testable without a network.
public struct C2SStateMachine {
    public enum Action: Equatable {
        /// Write raw text (stream headers, stream errors, the closing tag).
        case send(String)
        /// Write one top-level element into the `jabber:client` stream.
        case sendElement(XMLElement)
        /// `<proceed/>` has been queued: put TLS at the front of the pipeline now.
        case startTLS
        /// The next bytes start a new XML document (after TLS and after SASL success).
        case resetParser
        /// Fetch the account's stored SCRAM credentials, then call `credentialsLoaded`.
        case lookUpCredentials(username: String, host: String)
        /// Check a PLAIN password off the event loop, then call `plainVerified`.
        case verifyPlain(username: String, host: String, password: String)
        /// Check a FAST token's proof against the stored tokens, then call `tokenVerified`.
        case verifyToken(FASTVerification)
        /// Issue a FAST token (asked for, or the used one is due for rotation), then call `tokenIssued`.
        case issueToken(FASTIssue)
        /// Authentication failed: send `reply` after the failure delay (longer for repeat offenders).
        case authenticationFailed(reply: XMLElement)
        case authenticated(JID)
        /// Bind2 bound the resource: carry out `inline` (each an element the client put in `<bind/>` for a
        /// feature advertised inline), put what they answer into `success`'s `<bound/>`, then send it.
        case bind2Bound(success: XMLElement, inline: [XMLElement])
        /// Ask the session registry for a resource, then call `resourceBound` or `bindFailed`.
        case bindResource(user: JID, requested: String?, iq: XMLElement)
        /// XEP-0198: resume the detached session `previd` instead of binding; `h` is what the client handled.
        case resumeSession(user: JID, previd: String, h: UInt32)
        /// A stanza from the bound client, `from` stamped: route it.
        case route(XMLElement)
        /// A top-level non-stanza element from the bound client: offer it to the modules.
        case nonza(XMLElement)
        /// An IQ before authentication (in-band registration): offer it to the modules.
        case preAuthIQ(XMLElement)
        /// Close the connection once queued writes are out.
        case close
    }

    private enum SASLExchange {
        case scram(SCRAMServer, awaitingCredentials: Bool)
        case plain
        /// A FAST token's proof is being checked (one round trip: nothing more comes from the client).
        case token(SASL2Request, user: JID)
    }

    private enum State {
        /// Waiting for a stream header; what has been negotiated so far is in the properties.
        case awaitingHeader
        /// Header received and features sent, negotiating.
        case negotiating
        /// `<proceed/>` sent, TLS handshake running.
        case tlsHandshake
        case authenticating(SASLExchange)
        /// SASL2 succeeded; a FAST token is being issued for its `<success/>`.
        case issuingToken(user: JID, request: SASL2Request, additionalData: [UInt8]?)
        /// Bind request handed to the registry.
        case binding
        case bound(JID)
        case closed
    }

    public let settings: C2SSettings
    public let framing: C2SFraming
    private var state: State = .awaitingHeader
    private var headerSent = false
    public private(set) var tlsActive: Bool
    private var channelBinding: ChannelBinding?
    /// Mechanisms this client is not offered (`auth.mechanism_access` refuses its address).
    public var refusedMechanisms: Set<String> = []
    /// The SASL2 authentication under way (XEP-0388): its answers are SASL2's, and what it asked for inline.
    private var sasl2: SASL2Request?
    /// What the Bind2 request asked to enable inline, kept until the resource is bound.
    private var bind2Requests: [XMLElement] = []
    /// SASL2 succeeded with Bind2: its `<success/>` waits for the resource.
    private var sasl2SuccessPending: SASL2Success?
    public private(set) var host: String
    /// Bare JID once SASL succeeded.
    public private(set) var authenticatedUser: JID?
    private var saslAttempts = 0
    private var clientAddress: String?
    private let streamIDGenerator: () -> String

    public init(settings: C2SSettings, tlsActive: Bool, channelBinding: ChannelBinding? = nil, framing: C2SFraming = .stream,
                streamID: @escaping () -> String = { UUID().uuidString.lowercased() }) {
        self.settings = settings
        self.framing = framing
        self.tlsActive = tlsActive
        self.channelBinding = channelBinding
        self.host = settings.defaultHost
        self.streamIDGenerator = streamID
    }

    /// The full JID once a resource is bound.
    public var boundJID: JID? {
        if case .bound(let jid) = state { return jid }
        return nil
    }

    public var isClosed: Bool {
        if case .closed = state { return true }
        return false
    }

    // MARK: Events

    public mutating func streamOpened(header: XMLElement, defaultNamespace: String?) -> [Action] {
        switch state {
        case .awaitingHeader:
            break
        case .negotiating, .tlsHandshake, .authenticating, .issuingToken, .binding, .bound, .closed:
            return streamError(.notWellFormed, "unexpected stream header")
        }
        if let to = header[attribute: "to"], let domain = JID(to)?.domainpart, settings.hosts.contains(domain) {
            host = domain
        } else if let to = header[attribute: "to"] {
            return streamError(.hostUnknown, "this server does not serve \(to)")
        }
        clientAddress = header[attribute: "from"].flatMap { JID($0)?.description }
        var actions = [Action.send(streamHeader())]
        headerSent = true
        switch framing {
        case .stream:
            guard header.name == "stream", header.namespace == Namespace.stream else {
                return actions + streamError(.invalidNamespace, "the stream element must be <stream:stream/> in \(Namespace.stream)")
            }
            guard defaultNamespace == Namespace.client else {
                return actions + streamError(.invalidNamespace, "the default namespace must be \(Namespace.client)")
            }
        case .webSocket:
            guard header.name == "open", header.namespace == C2SFraming.namespace else {
                return actions + streamError(.invalidNamespace, "the stream opens with <open/> in \(C2SFraming.namespace)")
            }
        }
        guard let version = header[attribute: "version"], let major = version.split(separator: ".").first.flatMap({ Int($0) }), major >= 1 else {
            return actions + streamError(.unsupportedVersion, "XMPP 1.0 is required")
        }
        if major > 1 { return actions + streamError(.unsupportedVersion, "only XMPP 1.0 is supported") }
        state = .negotiating
        let featuresTag = framing == .stream ? "<stream:features>" : "<stream:features xmlns:stream='\(Namespace.stream)'>"
        actions.append(.send(featuresTag + features().map { $0.serialized(inheritedNamespace: Namespace.client) }.joined() + "</stream:features>"))
        return actions
    }

    public mutating func elementReceived(_ element: XMLElement) -> [Action] {
        switch state {
        case .negotiating:
            return negotiate(element)
        case .authenticating(let exchange):
            return continueAuthentication(exchange, element)
        case .bound(let jid):
            return stanzaFromClient(element, jid: jid)
        case .binding, .issuingToken:
            // Bind is in flight: a stanza now would race the registry; RFC 6120 §7.1 forbids it anyway.
            return streamError(.notAuthorized, "no stanzas before the resource is bound")
        case .awaitingHeader, .tlsHandshake:
            return streamError(.notWellFormed, "element before stream header")
        case .closed:
            return []
        }
    }

    public mutating func streamClosed() -> [Action] {
        switch state {
        case .closed:
            return []
        case .awaitingHeader, .negotiating, .tlsHandshake, .authenticating, .issuingToken, .binding, .bound:
            state = .closed
            return [.send(closingTag), .close]
        }
    }

    public mutating func parseFailed(_ error: XMLStreamError) -> [Action] {
        switch error {
        case .notWellFormed(let message): return streamError(.notWellFormed, message)
        case .restrictedXML(let message): return streamError(.restrictedXML, message)
        case .stanzaTooLarge(let limit): return streamError(.policyViolation, "stanza larger than \(limit) bytes")
        case .tooDeep(let limit): return streamError(.policyViolation, "elements nested deeper than \(limit)")
        }
    }

    public mutating func tlsEstablished(channelBinding: ChannelBinding?) -> [Action] {
        guard case .tlsHandshake = state else { return streamError(.internalServerError, nil) }
        tlsActive = true
        self.channelBinding = channelBinding
        state = .awaitingHeader
        headerSent = false
        return [.resetParser]
    }

    public mutating func credentialsLoaded(_ credentials: [SCRAMCredentials]?) -> [Action] {
        guard case .authenticating(.scram(var server, awaitingCredentials: true)) = state else { return [] }
        let chosen = credentials?.first { $0.hash == server.hash }
        switch server.receiveCredentials(chosen) {
        case .challenge(let data):
            state = .authenticating(.scram(server, awaitingCredentials: false))
            return [.sendElement(challengeElement(data))]
        case .success, .fail:
            return saslFailure(.notAuthorized)
        }
    }

    public mutating func plainVerified(username: String, success: Bool) -> [Action] {
        guard case .authenticating(.plain) = state else { return [] }
        return success ? saslSuccess(username: username, additionalData: nil) : saslFailure(.notAuthorized)
    }

    /// The stored tokens were checked: succeed (with the server's proof, and a new token when the used one is
    /// due for rotation) or fail.
    public mutating func tokenVerified(_ outcome: FASTVerificationOutcome) -> [Action] {
        guard case .authenticating(.token(let request, let user)) = state else { return [] }
        switch outcome {
        case .success(let responderProof, let rotate):
            sasl2 = request
            return saslSuccess(username: user.localpart!, additionalData: responderProof, rotateToken: rotate)
        case .failure(let failure):
            sasl2 = request
            return saslFailure(failure)
        }
    }

    /// The token asked for is stored (nil: it could not be, and the client logs in without one).
    public mutating func tokenIssued(_ token: IssuedFASTToken?) -> [Action] {
        guard case .issuingToken(let user, let request, let additionalData) = state else { return [] }
        return sasl2Succeeded(user: user, request: request, success: SASL2Success(additionalData: additionalData, token: token))
    }

    /// The store could not answer: tell the client to retry later instead of claiming a wrong password.
    public mutating func authenticationUnavailable() -> [Action] {
        guard case .authenticating = state else { return [] }
        state = .negotiating
        let reply = failureElement(.temporaryAuthFailure)
        sasl2 = nil
        return [.sendElement(reply)]
    }

    public mutating func resourceBound(_ jid: JID, iq: XMLElement) -> [Action] {
        guard case .binding = state else { return [] }
        state = .bound(jid)
        if let pending = sasl2SuccessPending {
            sasl2SuccessPending = nil
            let inline = bind2Requests
            bind2Requests = []
            return [.bind2Bound(success: SASL2.success(pending, identifier: jid, bound: true), inline: inline)]
        }
        var bind = XMLElement(name: "bind", namespace: Namespace.bind)
        bind.append(XMLElement(name: "jid", namespace: Namespace.bind).with(text: jid.description))
        var result = iq.iqResult(payload: bind)
        result[attribute: "from"] = nil
        result[attribute: "to"] = nil
        return [.sendElement(result)]
    }

    /// The detached session was taken over: the stream is bound to its resource.
    public mutating func resumed(_ jid: JID) -> [Action] {
        guard case .binding = state else { return [] }
        state = .bound(jid)
        return []
    }

    /// No such detached session (or not this account's): the client may bind instead.
    public mutating func resumeFailed() -> [Action] {
        guard case .binding = state else { return [] }
        state = .negotiating
        return [.sendElement(StreamManagement.failed(.itemNotFound))]
    }

    public mutating func bindFailed(_ condition: StanzaErrorCondition, iq: XMLElement) -> [Action] {
        guard case .binding = state else { return [] }
        state = .negotiating
        if sasl2SuccessPending != nil {
            // Authenticated, but no resource: the client may still bind the RFC 6120 way on this stream.
            sasl2SuccessPending = nil
            var failure = XMLElement(name: "failure", namespace: SASL2.namespace)
            failure.append(XMLElement(name: SASLFailure.temporaryAuthFailure.rawValue, namespace: Namespace.sasl))
            failure.append(XMLElement(name: "text", namespace: SASL2.namespace).with(text: "no resource could be bound (\(condition.rawValue))"))
            return [.sendElement(failure)]
        }
        return [.sendElement(iq.errorReply(condition))]
    }

    /// Another session took this resource (RFC 6120 §7.7.2.2).
    public mutating func replaced() -> [Action] {
        streamError(.conflict, "replaced by a new connection")
    }

    public mutating func idleTimedOut() -> [Action] {
        streamError(.connectionTimeout, "no data received for too long")
    }

    public mutating func authenticationTimedOut() -> [Action] {
        switch state {
        case .bound, .closed: return []
        case .awaitingHeader, .negotiating, .tlsHandshake, .authenticating, .issuingToken, .binding:
            return streamError(.policyViolation, "authentication took too long")
        }
    }

    public mutating func shuttingDown() -> [Action] {
        streamError(.systemShutdown, "the server is shutting down")
    }

    /// A condition the state machine did not detect itself (e.g. the storage failed): close cleanly.
    public mutating func fail(_ condition: StreamErrorCondition, _ text: String?) -> [Action] {
        streamError(condition, text)
    }

    // MARK: Negotiation

    private func offeredMechanisms() -> [String] {
        if !tlsActive && settings.tlsRequired { return [] }
        let moduleDecides = settings.moduleAuthenticatedHosts.contains(host)
        return settings.mechanisms.filter { mechanism in
            if moduleDecides && mechanism != "PLAIN" || refusedMechanisms.contains(mechanism) { return false }
            if mechanism.hasSuffix("-PLUS") { return tlsActive && channelBinding != nil }
            if mechanism == "PLAIN" { return tlsActive || settings.plainWithoutTLS }
            return true
        }
    }

    /// XEP-0484: FAST only over TLS, inside SASL2, where accounts are stored here; a mechanism with channel
    /// binding only when this connection has that binding.
    private func offeredFASTMechanisms() -> [String] {
        guard tlsActive, settings.offersSASL2, !settings.moduleAuthenticatedHosts.contains(host) else { return [] }
        return settings.fastMechanisms.filter { name in
            guard let mechanism = HashedTokenMechanism(rawValue: name), !refusedMechanisms.contains(name) else { return false }
            guard let type = mechanism.channelBindingType else { return true }
            return channelBinding?.type == type
        }
    }

    private func features() -> [XMLElement] {
        var features: [XMLElement] = []
        if authenticatedUser != nil {
            features.append(XMLElement(name: "bind", namespace: Namespace.bind))
            var session = XMLElement(name: "session", namespace: Namespace.session)
            session.append(XMLElement(name: "optional", namespace: Namespace.session))
            features.append(session)
            return features + (settings.boundFeatures[host] ?? [])
        }
        if !tlsActive && settings.offersStartTLS {
            var starttls = XMLElement(name: "starttls", namespace: Namespace.tls)
            if settings.tlsRequired { starttls.append(XMLElement(name: "required", namespace: Namespace.tls)) }
            features.append(starttls)
        }
        let mechanisms = offeredMechanisms()
        if !mechanisms.isEmpty {
            var list = XMLElement(name: "mechanisms", namespace: Namespace.sasl)
            for mechanism in mechanisms {
                list.append(XMLElement(name: "mechanism", namespace: Namespace.sasl).with(text: mechanism))
            }
            features.append(list)
            if settings.offersSASL2 {
                var authentication = XMLElement(name: "authentication", namespace: SASL2.namespace)
                for mechanism in mechanisms {
                    authentication.append(XMLElement(name: "mechanism", namespace: SASL2.namespace).with(text: mechanism))
                }
                var inline = XMLElement(name: "inline", namespace: SASL2.namespace)
                var bind = XMLElement(name: "bind", namespace: SASL2.bind2)
                if let enabled = settings.bind2Inline[host], !enabled.isEmpty {
                    var bindInline = XMLElement(name: "inline", namespace: SASL2.bind2)
                    for namespace in enabled { bindInline.append(XMLElement(name: "feature", namespace: SASL2.bind2, attributes: ["var": namespace])) }
                    bind.append(bindInline)
                }
                inline.append(bind)
                let fast = offeredFASTMechanisms()
                if !fast.isEmpty {
                    var element = XMLElement(name: "fast", namespace: FAST.namespace)
                    for mechanism in fast { element.append(XMLElement(name: "mechanism", namespace: FAST.namespace).with(text: mechanism)) }
                    inline.append(element)
                }
                authentication.append(inline)
                features.append(authentication)
            }
            if let channelBinding {
                // XEP-0440: say which channel-binding types we support.
                var types = XMLElement(name: "sasl-channel-binding", namespace: Namespace.saslChannelBinding)
                types.append(XMLElement(name: "channel-binding", namespace: Namespace.saslChannelBinding, attributes: ["type": channelBinding.type]))
                features.append(types)
            }
            features += settings.preAuthFeatures[host] ?? []
        }
        return features
    }

    private mutating func negotiate(_ element: XMLElement) -> [Action] {
        switch (element.namespace, element.name) {
        case (Namespace.tls, "starttls"):
            guard !tlsActive, settings.offersStartTLS, authenticatedUser == nil else {
                state = .closed
                return [.sendElement(XMLElement(name: "failure", namespace: Namespace.tls)), .send(closingTag), .close]
            }
            state = .tlsHandshake
            return [.sendElement(XMLElement(name: "proceed", namespace: Namespace.tls)), .startTLS]
        case (Namespace.sasl, "auth"):
            sasl2 = nil
            return startAuthentication(element, initialResponse: element)
        case (SASL2.namespace, "authenticate") where settings.offersSASL2:
            sasl2 = SASL2Request(element, fastMechanisms: offeredFASTMechanisms())
            // No <initial-response/> is no initial response; an empty one is an empty response.
            let initial = element.child("initial-response", namespace: SASL2.namespace) ?? XMLElement(name: "initial-response", namespace: SASL2.namespace)
            return startAuthentication(element, initialResponse: initial)
        case (Namespace.client, "iq") where authenticatedUser != nil:
            return iqBeforeBind(element)
        case (StreamManagement.namespace, "resume") where authenticatedUser != nil:
            guard let previd = element[attribute: "previd"], let h = element[attribute: "h"].flatMap({ UInt32($0) }) else {
                return [.sendElement(StreamManagement.failed(.badRequest))]
            }
            state = .binding
            return [.resumeSession(user: authenticatedUser!, previd: previd, h: h)]
        case (StreamManagement.namespace, "enable") where authenticatedUser != nil:
            // XEP-0198 §3: only once a resource is bound.
            return [.sendElement(StreamManagement.failed(.unexpectedRequest))]
        case (Namespace.client, "iq") where !offeredMechanisms().isEmpty && !(settings.preAuthFeatures[host] ?? []).isEmpty:
            // Only where a module offers something before authentication (in-band registration), and
            // only once authentication itself would be allowed (i.e. after TLS when TLS is required).
            return [.preAuthIQ(element)]
        default:
            if authenticatedUser == nil && !tlsActive && settings.tlsRequired {
                return streamError(.policyViolation, "STARTTLS is required")
            }
            return streamError(.notAuthorized, "authenticate and bind a resource first")
        }
    }

    private mutating func iqBeforeBind(_ iq: XMLElement) -> [Action] {
        guard let user = authenticatedUser else { return streamError(.notAuthorized, nil) }
        if iq[attribute: "type"] == "set", let bind = iq.child("bind", namespace: Namespace.bind) {
            let requested = bind.child("resource", namespace: Namespace.bind)?.text
            state = .binding
            return [.bindResource(user: user, requested: requested?.isEmpty == true ? nil : requested, iq: iq)]
        }
        return streamError(.notAuthorized, "bind a resource first")
    }

    /// `initialResponse` holds the base64 text (the `<auth/>` itself, or SASL2's `<initial-response/>`).
    private mutating func startAuthentication(_ element: XMLElement, initialResponse: XMLElement) -> [Action] {
        guard authenticatedUser == nil else { return streamError(.policyViolation, "already authenticated") }
        saslAttempts += 1
        if saslAttempts > settings.maxSASLAttempts {
            return streamError(.policyViolation, "too many authentication attempts")
        }
        if !tlsActive && settings.tlsRequired {
            return [.sendElement(failureElement(.encryptionRequired))]
        }
        let mechanism = element[attribute: "mechanism"] ?? ""
        if let request = sasl2, let tokenMechanism = HashedTokenMechanism(rawValue: mechanism), offeredFASTMechanisms().contains(mechanism) {
            return startTokenAuthentication(tokenMechanism, request: request, initialResponse: initialResponse)
        }
        let offered = offeredMechanisms()
        guard offered.contains(mechanism) else {
            return [.sendElement(failureElement(.invalidMechanism))]
        }
        let initial: [UInt8]?
        switch Self.decodeSASLData(initialResponse) {
        case .success(let data): initial = data
        case .failure: return [.sendElement(failureElement(.incorrectEncoding))]
        }
        if mechanism == "PLAIN" {
            state = .authenticating(.plain)
            guard let initial else {
                return [.sendElement(challengeElement([]))]
            }
            return receivePlain(initial)
        }
        let plus = mechanism.hasSuffix("-PLUS")
        let hash: SCRAMHash = mechanism.hasPrefix("SCRAM-SHA-256") ? .sha256 : .sha1
        let server = SCRAMServer(hash: hash, plus: plus, channelBinding: channelBinding,
                                 advertisedPlus: offered.contains { $0.hasSuffix("-PLUS") })
        state = .authenticating(.scram(server, awaitingCredentials: false))
        guard let initial else {
            return [.sendElement(challengeElement([]))]
        }
        return receiveSCRAMFirst(server, initial)
    }

    /// XEP-0484: one message, `username NUL proof`, checked against the client's stored tokens.
    private mutating func startTokenAuthentication(_ mechanism: HashedTokenMechanism, request: SASL2Request, initialResponse: XMLElement) -> [Action] {
        guard let client = request.userAgent?.id else {
            // Tokens belong to a client installation: without its id there is nothing to look up.
            return [.sendElement(failureElement(.malformedRequest))]
        }
        let message: HashedTokenMessage
        switch Self.decodeSASLData(initialResponse) {
        case .success(let data?):
            do { message = try HashedTokenMessage(parsing: data) } catch { return [.sendElement(failureElement(error))] }
        case .success(nil):
            return [.sendElement(failureElement(.malformedRequest))]
        case .failure:
            return [.sendElement(failureElement(.incorrectEncoding))]
        }
        guard let user = try? JID(localpart: message.username, domainpart: host) else { return saslFailure(.notAuthorized) }
        state = .authenticating(.token(request, user: user))
        let binding = mechanism.channelBindingType == nil ? [] : channelBinding?.data ?? []
        return [.verifyToken(FASTVerification(user: user, client: client, mechanism: mechanism.rawValue, proof: message.proof,
                                              channelBinding: binding, invalidate: request.invalidateToken,
                                              requestsToken: request.tokenMechanism != nil))]
    }

    private mutating func continueAuthentication(_ exchange: SASLExchange, _ element: XMLElement) -> [Action] {
        guard element.namespace == (sasl2 == nil ? Namespace.sasl : SASL2.namespace) else {
            return streamError(.notAuthorized, "authentication in progress")
        }
        if element.name == "abort" {
            state = .negotiating
            let reply = failureElement(.aborted)
            sasl2 = nil
            return [.sendElement(reply)]
        }
        guard element.name == "response" else { return streamError(.notAuthorized, "expected <response/>") }
        let data: [UInt8]
        switch Self.decodeSASLData(element) {
        case .success(let decoded): data = decoded ?? []
        case .failure: return saslFailure(.incorrectEncoding)
        }
        switch exchange {
        case .plain:
            return receivePlain(data)
        case .token:
            return streamError(.policyViolation, "the token authentication takes no response")
        case .scram(let server, let awaitingCredentials):
            if awaitingCredentials { return streamError(.policyViolation, "response before challenge") }
            if server.isAwaitingClientFirst {
                return receiveSCRAMFirst(server, data)
            }
            var server = server
            switch server.receiveClientFinal(data) {
            case .success(let additional, let username, _):
                return saslSuccess(username: username, additionalData: additional)
            case .challenge:
                return saslFailure(.malformedRequest)
            case .fail(let failure):
                return saslFailure(failure)
            }
        }
    }

    private mutating func receiveSCRAMFirst(_ server: SCRAMServer, _ data: [UInt8]) -> [Action] {
        var server = server
        switch server.receiveClientFirst(data) {
        case .fail(let failure):
            return saslFailure(failure)
        case .lookUpCredentials(let username, let authzid):
            guard let user = try? JID(localpart: username, domainpart: host) else { return saslFailure(.notAuthorized) }
            if let authzid, JID(authzid)?.bare != user.bare { return saslFailure(.invalidAuthzid) }
            state = .authenticating(.scram(server, awaitingCredentials: true))
            return [.lookUpCredentials(username: user.localpart!, host: host)]
        }
    }

    private mutating func receivePlain(_ data: [UInt8]) -> [Action] {
        let message: PLAINMessage
        do { message = try PLAINMessage(parsing: data) } catch { return saslFailure(error) }
        guard let user = try? JID(localpart: message.username, domainpart: host) else { return saslFailure(.notAuthorized) }
        if let authzid = message.authzid, JID(authzid)?.bare != user.bare { return saslFailure(.invalidAuthzid) }
        return [.verifyPlain(username: user.localpart!, host: host, password: message.password)]
    }

    private mutating func saslSuccess(username: String, additionalData: [UInt8]?, rotateToken: Bool = false) -> [Action] {
        guard let user = try? JID(localpart: username, domainpart: host) else { return saslFailure(.notAuthorized) }
        authenticatedUser = user
        guard let request = sasl2 else {
            state = .awaitingHeader
            headerSent = false
            return [.sendElement(Self.saslElement("success", data: additionalData)), .authenticated(user), .resetParser]
        }
        // SASL2 keeps the stream (no restart).
        sasl2 = nil
        if let issue = request.tokenIssue(for: user, rotating: rotateToken) {
            state = .issuingToken(user: user, request: request, additionalData: additionalData)
            return [.authenticated(user), .issueToken(issue)]
        }
        return [.authenticated(user)] + sasl2Succeeded(user: user, request: request, success: SASL2Success(additionalData: additionalData, token: nil))
    }

    /// SASL2's `<success/>` now, or with Bind2 once the resource is bound (it names the full JID then).
    private mutating func sasl2Succeeded(user: JID, request: SASL2Request, success: SASL2Success) -> [Action] {
        guard let bind = request.bind else {
            state = .negotiating
            return [.sendElement(SASL2.success(success, identifier: user, bound: false))]
        }
        state = .binding
        sasl2SuccessPending = success
        // Only what was advertised for this host; anything else in <bind/> is ignored (XEP-0386 §5).
        let offered = Set(settings.bind2Inline[host] ?? [])
        bind2Requests = bind.elements.filter { $0.namespace != SASL2.bind2 && offered.contains($0.namespace) }
        let synthetic = XMLElement(name: "iq", namespace: Namespace.client, attributes: ["type": "set", "id": "bind2"])
        return [.bindResource(user: user, requested: SASL2.resource(tag: bind.child("tag", namespace: SASL2.bind2)?.text), iq: synthetic)]
    }

    private mutating func saslFailure(_ failure: SASLFailure) -> [Action] {
        state = .negotiating
        let reply = failureElement(failure)
        sasl2 = nil
        if failure == .notAuthorized || failure == .invalidAuthzid {
            return [.authenticationFailed(reply: reply)]
        }
        return [.sendElement(reply)]
    }

    // MARK: Bound session

    private mutating func stanzaFromClient(_ element: XMLElement, jid: JID) -> [Action] {
        guard element.namespace == Namespace.client, let kind = StanzaKind(rawValue: element.name) else {
            if element.namespace == Namespace.sasl || element.namespace == Namespace.tls {
                return streamError(.policyViolation, "negotiation is over")
            }
            if element.namespace == Namespace.client || element.namespace.isEmpty {
                return streamError(.unsupportedStanzaType, "<\(element.name)/> is not a stanza")
            }
            return [.nonza(element)]
        }
        var stanza = element
        // RFC 6120 §8.1.2.1: the server stamps the full JID; a client claiming someone else is cut off.
        if let from = stanza[attribute: "from"] {
            guard let claimed = JID(from), claimed == jid || claimed == jid.bare else {
                return streamError(.invalidFrom, "'\(from)' is not this session's address")
            }
        }
        stanza[attribute: "from"] = jid.description
        if let to = stanza[attribute: "to"], JID(to) == nil {
            if kind == .presence && stanza[attribute: "type"] == "error" { return [] }
            return [.sendElement(Self.bounce(stanza, .jidMalformed, jid: jid))]
        }
        if kind == .iq {
            let type = stanza[attribute: "type"]
            switch type {
            case "get", "set":
                guard stanza[attribute: "id"] != nil, stanza.elements.count == 1 else {
                    return [.sendElement(Self.bounce(stanza, .badRequest, jid: jid))]
                }
                if type == "set", stanza[attribute: "to"] == nil || JID(stanza[attribute: "to"]!) == jid.domain,
                   stanza.child("session", namespace: Namespace.session) != nil {
                    // RFC 3921 session establishment, kept for old clients: nothing left to do.
                    var result = stanza.iqResult()
                    result[attribute: "from"] = nil
                    result[attribute: "to"] = jid.description
                    return [.sendElement(result)]
                }
            case "result", "error":
                guard stanza[attribute: "id"] != nil else { return [] }
            default:
                return [.sendElement(Self.bounce(stanza, .badRequest, jid: jid))]
            }
        }
        return [.route(stanza)]
    }

    /// An error reply addressed back to the sending client itself.
    private static func bounce(_ stanza: XMLElement, _ condition: StanzaErrorCondition, jid: JID) -> XMLElement {
        var reply = stanza.errorReply(condition)
        reply[attribute: "to"] = jid.description
        reply[attribute: "from"] = stanza[attribute: "to"].flatMap { JID($0)?.description }
        return reply
    }

    // MARK: Helpers

    /// What ends the stream: its end tag, or on WebSocket the framing's `<close/>`.
    private var closingTag: String {
        switch framing {
        case .stream: return "</stream:stream>"
        case .webSocket: return "<close xmlns='\(C2SFraming.namespace)'/>"
        }
    }

    private func streamHeader() -> String {
        var header: String
        switch framing {
        case .stream:
            header = "<?xml version='1.0'?><stream:stream xmlns='\(Namespace.client)' xmlns:stream='\(Namespace.stream)' id='\(streamIDGenerator())' from='"
        case .webSocket:
            header = "<open xmlns='\(C2SFraming.namespace)' id='\(streamIDGenerator())' from='"
        }
        XMLElement.escapeAttribute(host, into: &header)
        header += "'"
        if let clientAddress {
            header += " to='"
            XMLElement.escapeAttribute(clientAddress, into: &header)
            header += "'"
        }
        header += framing == .stream ? " version='1.0' xml:lang='en'>" : " version='1.0' xml:lang='en'/>"
        return header
    }

    private mutating func streamError(_ condition: StreamErrorCondition, _ text: String?) -> [Action] {
        if case .closed = state { return [] }
        var actions: [Action] = []
        if !headerSent {
            actions.append(.send(streamHeader()))
            headerSent = true
        }
        state = .closed
        switch framing {
        case .stream:
            actions.append(.send(condition.element(text: text) + closingTag))
        case .webSocket:
            // Every WebSocket message is a document of its own: the error declares its prefix.
            actions.append(.send(condition.element(text: text, declaringPrefix: true)))
            actions.append(.send(closingTag))
        }
        actions.append(.close)
        return actions
    }

    static func saslElement(_ name: String, data: [UInt8]?, namespace: String = Namespace.sasl) -> XMLElement {
        var element = XMLElement(name: name, namespace: namespace)
        if let data {
            element.append(text: data.isEmpty ? "=" : Data(data).base64EncodedString())
        }
        return element
    }

    /// A challenge in the namespace of the authentication under way.
    private func challengeElement(_ data: [UInt8]) -> XMLElement {
        Self.saslElement("challenge", data: data, namespace: sasl2 == nil ? Namespace.sasl : SASL2.namespace)
    }

    /// A failure as the authentication under way words it: RFC 6120's, or SASL2's wrapping the same condition.
    private func failureElement(_ failure: SASLFailure) -> XMLElement {
        guard sasl2 != nil else { return Self.saslFailureElement(failure) }
        var element = XMLElement(name: "failure", namespace: SASL2.namespace)
        element.append(XMLElement(name: failure.rawValue, namespace: Namespace.sasl))
        return element
    }

    static func saslFailureElement(_ failure: SASLFailure) -> XMLElement {
        var element = XMLElement(name: "failure", namespace: Namespace.sasl)
        element.append(XMLElement(name: failure.rawValue, namespace: Namespace.sasl))
        return element
    }

    private enum DecodeFailure: Error { case invalid }

    /// SASL payloads are base64; "=" is an empty payload and no text is no payload (RFC 6120 §6.4.2).
    private static func decodeSASLData(_ element: XMLElement) -> Result<[UInt8]?, DecodeFailure> {
        // XML whitespace only, byte by byte: base64 is ASCII, and walking Characters costs grapheme breaking.
        let text = element.text.utf8.filter { $0 != 0x20 && $0 != 0x09 && $0 != 0x0A && $0 != 0x0D }
        if text.isEmpty { return .success(nil) }
        if text == [UInt8(ascii: "=")] { return .success([]) }
        guard let data = Data(base64Encoded: Data(text)) else { return .failure(.invalid) }
        return .success(Array(data))
    }
}

/// What a SASL2 `<authenticate/>` asked for inline.
struct SASL2Request: Equatable {
    /// XEP-0386 `<bind/>`: bind a resource as part of authenticating.
    var bind: XMLElement?
    /// XEP-0388 `<user-agent/>`: the client installation (FAST tokens belong to its `id`).
    var userAgent: SASL2UserAgent?
    /// XEP-0484 `<request-token mechanism/>`, when it names a FAST mechanism offered here.
    var tokenMechanism: String?
    /// XEP-0484 `<fast invalidate='true'/>`: the token authenticating is to be forgotten.
    var invalidateToken = false
    /// The FAST mechanism authenticating, if any (a rotated token is issued for the same one).
    var fastMechanism: String?

    init(bind: XMLElement? = nil) {
        self.bind = bind
    }

    init(_ authenticate: XMLElement, fastMechanisms: [String]) {
        bind = authenticate.child("bind", namespace: SASL2.bind2)
        userAgent = authenticate.child("user-agent", namespace: SASL2.namespace).flatMap(SASL2UserAgent.init)
        if let requested = authenticate.child("request-token", namespace: FAST.namespace)?[attribute: "mechanism"], fastMechanisms.contains(requested) {
            tokenMechanism = requested
        }
        if let mechanism = authenticate[attribute: "mechanism"], fastMechanisms.contains(mechanism) {
            fastMechanism = mechanism
            let invalidate = authenticate.child("fast", namespace: FAST.namespace)?[attribute: "invalidate"]
            invalidateToken = invalidate == "true" || invalidate == "1"
        }
    }

    /// The token to issue on success: the one asked for, else (unless the client is logging this token out) a
    /// replacement for a token due for rotation. Only for clients that say who they are.
    func tokenIssue(for user: JID, rotating: Bool) -> FASTIssue? {
        guard let userAgent else { return nil }
        let mechanism = tokenMechanism ?? (rotating && !invalidateToken ? fastMechanism : nil)
        return mechanism.map { FASTIssue(user: user, client: userAgent.id, mechanism: $0, software: userAgent.software, device: userAgent.device) }
    }
}

/// XEP-0388's `<user-agent id>` with its optional `<software/>` and `<device/>`, each bounded in length.
struct SASL2UserAgent: Equatable {
    static let maxLength = 256
    var id: String
    var software: String?
    var device: String?

    init?(_ element: XMLElement) {
        guard let id = element[attribute: "id"], !id.isEmpty, id.utf8.count <= Self.maxLength else { return nil }
        self.id = id
        software = element.child("software", namespace: SASL2.namespace).map { String($0.text.prefix(Self.maxLength)) }
        device = element.child("device", namespace: SASL2.namespace).map { String($0.text.prefix(Self.maxLength)) }
    }
}

/// What SASL2's `<success/>` carries besides who the client is.
struct SASL2Success: Equatable {
    /// The mechanism's last word (SCRAM's server signature, HT's responder proof).
    var additionalData: [UInt8]?
    /// A XEP-0484 token issued with this success.
    var token: IssuedFASTToken?
}

/// XEP-0484 wire forms.
enum FAST {
    static let namespace = "urn:xmpp:fast:0"

    static func tokenElement(_ token: IssuedFASTToken) -> XMLElement {
        XMLElement(name: "token", namespace: namespace, attributes: ["expiry": XMPPDateTime.string(Double(token.expiresAt)), "token": token.token])
    }
}

/// XEP-0388 (SASL2) and XEP-0386 (Bind2) wire forms.
enum SASL2 {
    static let namespace = "urn:xmpp:sasl:2"
    static let bind2 = "urn:xmpp:bind:0"

    /// `<success/>`: the mechanism's additional data, who the client now is (a full JID once bound), and a
    /// FAST token if one was issued.
    static func success(_ success: SASL2Success, identifier: JID, bound: Bool) -> XMLElement {
        var element = XMLElement(name: "success", namespace: namespace)
        if let additionalData = success.additionalData {
            element.append(XMLElement(name: "additional-data", namespace: namespace).with(text: Data(additionalData).base64EncodedString()))
        }
        element.append(XMLElement(name: "authorization-identifier", namespace: namespace).with(text: identifier.description))
        if let token = success.token { element.append(FAST.tokenElement(token)) }
        if bound { element.append(XMLElement(name: "bound", namespace: bind2)) }
        return element
    }

    /// XEP-0386 §4: the client names its software with a tag; the resource is the tag and something unique.
    static func resource(tag: String?) -> String? {
        let unique = String(UUID().uuidString.prefix(8)).lowercased()
        guard let tag = tag?.trimmingCharacters(in: .whitespacesAndNewlines), !tag.isEmpty else { return nil }
        return "\(tag.prefix(64)).\(unique)"
    }
}
