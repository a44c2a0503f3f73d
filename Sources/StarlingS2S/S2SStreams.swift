import Foundation
import StarlingAPI
import StarlingXML

/// A local domain and a remote one: what one s2s stream is authorized for (RFC 6120 §13.7.1.2 and
/// XEP-0220 both authorize domain pairs, not connections).
public struct DomainPair: Hashable, Sendable, CustomStringConvertible {
    public let local: String
    public let remote: String
    public init(local: String, remote: String) {
        self.local = local
        self.remote = remote
    }
    public var description: String { "\(local)→\(remote)" }
}

/// XEP-0288's namespaces.
public enum BidiNamespace {
    public static let feature = "urn:xmpp:features:bidi"
    public static let request = "urn:xmpp:bidi"
}

/// A key an originating server gave us on an incoming stream, to be checked with its authoritative server.
public struct DialbackRequest: Hashable, Sendable {
    public let pair: DomainPair
    public let key: String
    /// The id of our stream that the key was generated for.
    public let streamID: String
}

/// What the authoritative server said about a dialback key.
public enum DialbackOutcome: Equatable, Sendable {
    case valid
    case invalid
    /// It could not be asked (unreachable, timed out, refused the stream).
    case error(StanzaErrorCondition)
}

/// The TLS peer's certificate, as checked against the trust roots; nil names mean it did not verify.
public struct PeerIdentity: Sendable, Equatable {
    /// DNS names the verified certificate holds (subjectAltName dNSName), lowercased; may hold `*.` wildcards.
    public let names: [String]

    public init(names: [String]) { self.names = names.map { $0.lowercased() } }

    /// RFC 6125 §6.4: an exact match, or a wildcard in the leftmost label matching exactly one label.
    public func covers(_ domain: String) -> Bool {
        let domain = domain.lowercased()
        return names.contains { name in
            if name == domain { return true }
            guard name.hasPrefix("*."), let dot = domain.firstIndex(of: ".") else { return false }
            return domain[dot...] == name.dropFirst()
        }
    }
}

/// How an s2s stream is set up.
public struct S2SStreamSettings: Sendable {
    /// Whether this server answers for a domain on s2s: its hosts and its components' domains (which
    /// modules may add and remove at run time, hence asked rather than listed).
    public var serves: @Sendable (String) -> Bool
    /// The domain named in a stream error sent before the peer said which domain it wanted.
    public var defaultDomain: String
    /// STARTTLS before anything else (RFC 6120 §5.3.1 makes it mandatory to offer; we also require it).
    public var requireTLS: Bool
    /// Server Dialback (XEP-0220) when the peer's certificate does not authenticate it. Without it,
    /// every peer must present a certificate that verifies for its domain, in both directions.
    public var dialback: Bool
    /// XEP-0288: offer and request bidirectional streams (stanzas both ways on one connection).
    public var bidi = true

    public init(defaultDomain: String, requireTLS: Bool = true, dialback: Bool = true, serves: @escaping @Sendable (String) -> Bool) {
        self.defaultDomain = defaultDomain
        self.serves = serves
        self.requireTLS = requireTLS
        self.dialback = dialback
    }
}

enum S2SHeader {
    /// The opening tag of an s2s stream (RFC 6120 §4.7), with the dialback prefix declared for XEP-0220.
    static func open(from: String, to: String?, id: String?) -> String {
        var header = "<?xml version='1.0'?><stream:stream xmlns='\(Namespace.server)' xmlns:stream='\(Namespace.stream)' xmlns:db='\(DialbackNamespace.stream)'"
        if let id { header += " id='"; XMLElement.escapeAttribute(id, into: &header); header += "'" }
        header += " from='"; XMLElement.escapeAttribute(from, into: &header); header += "'"
        if let to { header += " to='"; XMLElement.escapeAttribute(to, into: &header); header += "'" }
        header += " version='1.0'>"
        return header
    }

    static func dialback(_ name: String, from: String, to: String, type: String? = nil, id: String? = nil, key: String? = nil,
                         error: StanzaErrorCondition? = nil) -> String {
        var element = XMLElement(name: name, namespace: DialbackNamespace.stream, attributes: ["from": from, "to": to])
        element.prefix = "db"
        if let type { element[attribute: "type"] = type }
        if let id { element[attribute: "id"] = id }
        if let key { element.append(text: key) }
        if let error {
            // XEP-0220 §2.4: dialback errors are stanza errors in the default namespace.
            var wrapper = XMLElement(name: "error", namespace: Namespace.server, attributes: ["type": "cancel"])
            wrapper.append(XMLElement(name: error.rawValue, namespace: Namespace.stanzaErrors))
            element.append(wrapper)
        }
        return element.serialized(inheritedNamespace: Namespace.server)
    }

    /// Checks a received header's element and namespaces; the problem as a stream error otherwise.
    static func problem(_ header: XMLElement, defaultNamespace: String?) -> (StreamErrorCondition, String)? {
        guard header.name == "stream", header.namespace == Namespace.stream else {
            return (.invalidNamespace, "the stream element must be <stream:stream/> in \(Namespace.stream)")
        }
        guard defaultNamespace == Namespace.server else {
            return (.invalidNamespace, "the default namespace of a server stream must be \(Namespace.server)")
        }
        guard let version = header[attribute: "version"], let major = version.split(separator: ".").first.flatMap({ Int($0) }), major == 1 else {
            return (.unsupportedVersion, "XMPP 1.0 is required")
        }
        return nil
    }
}

extension XMLElement {
    /// The stanza with every element of `from` (the stream's default namespace) moved to `to`:
    /// `jabber:client` inside the server, `jabber:server` on the wire between servers.
    public func movingNamespace(_ from: String, to: String) -> XMLElement {
        var copy = self
        if copy.namespace == from { copy.namespace = to }
        copy.children = copy.children.map { child in
            if case .element(let element) = child { return .element(element.movingNamespace(from, to: to)) }
            return child
        }
        return copy
    }
}

/// What both directions' machines take from the parser.
public protocol S2SStreamMachine {
    associatedtype Action
    mutating func streamOpened(header: XMLElement, defaultNamespace: String?) -> [Action]
    mutating func elementReceived(_ element: XMLElement) -> [Action]
    mutating func streamClosed() -> [Action]
}

extension S2SStreamMachine {
    /// One parser event, whichever it is.
    public mutating func received(_ event: XMLStreamEvent) -> [Action] {
        switch event {
        case .streamOpen(let header, let namespace): return streamOpened(header: header, defaultNamespace: namespace)
        case .stanza(let element): return elementReceived(element)
        case .streamClose: return streamClosed()
        }
    }
}

// MARK: Incoming streams

/// An s2s stream another server opened to us (RFC 6120, XEP-0178, XEP-0220): TLS, then SASL EXTERNAL
/// for a peer whose certificate verifies or dialback for one whose does not, then stanzas from the
/// domains it authenticated. The handler carries out the actions.
public struct S2SIncomingMachine: S2SStreamMachine {
    public enum Action: Equatable {
        case send(String)
        /// `<proceed/>` is out: put TLS under the stream and start a new document.
        case startTLS
        /// SASL succeeded: the peer starts a new stream on the same connection.
        case resetParser
        /// Ask the originating domain's authoritative server whether the key is one it gave out.
        case verifyDialback(DialbackRequest)
        /// The peer may now send stanzas from `pair.remote` to `pair.local`; it comes before the answer
        /// that tells the peer so, so the handler can still refuse (limits) instead.
        case authenticated(DomainPair, method: String)
        /// A stanza from an authenticated domain to one of ours, namespace as received.
        case deliver(XMLElement)
        /// XEP-0288: the peer asked for a bidirectional stream and `pair` is authenticated: stanzas from
        /// `pair.local` to `pair.remote` may go out on this stream too.
        case bidirectional(DomainPair)
        case close
    }

    private enum State {
        case awaitingHeader
        case open
        case closed
    }

    /// The peer sent `<bidi/>` (XEP-0288) before authenticating.
    public private(set) var bidiRequested = false

    public let settings: S2SStreamSettings
    private let keys: DialbackKeys
    private let streamIDGenerator: () -> String
    private var state = State.awaitingHeader
    private var headerSent = false
    public private(set) var tlsActive: Bool
    public private(set) var streamID = ""
    /// What the header named: the domain it addressed here, and the peer's.
    public private(set) var localDomain: String?
    public private(set) var remoteDomain: String?
    /// Set by the handler once the TLS peer's certificate was checked.
    public var peerIdentity: PeerIdentity?
    private var saslDone = false
    public private(set) var authenticated: Set<DomainPair> = []
    private var pending: Set<DialbackRequest> = []

    public init(settings: S2SStreamSettings, keys: DialbackKeys, tlsActive: Bool, streamIDGenerator: @escaping () -> String = { UUID().uuidString.lowercased() }) {
        self.settings = settings
        self.keys = keys
        self.tlsActive = tlsActive
        self.streamIDGenerator = streamIDGenerator
    }

    public var isClosed: Bool {
        switch state {
        case .closed: return true
        case .awaitingHeader, .open: return false
        }
    }

    public mutating func streamOpened(header: XMLElement, defaultNamespace: String?) -> [Action] {
        switch state {
        case .awaitingHeader: break
        case .open: return streamError(.notWellFormed, "unexpected stream header")
        case .closed: return []
        }
        let to = header[attribute: "to"].flatMap { JID($0) }
        if let to, to.localpart == nil, to.resourcepart == nil, settings.serves(to.domainpart) {
            localDomain = to.domainpart
        } else {
            return streamError(.hostUnknown, "this server does not serve \(header[attribute: "to"] ?? "(no 'to')")")
        }
        if let fromText = header[attribute: "from"] {
            guard let from = JID(fromText), from.localpart == nil, from.resourcepart == nil else {
                return streamError(.invalidFrom, "'\(fromText)' is not a domain")
            }
            remoteDomain = from.domainpart
        }
        streamID = streamIDGenerator()
        var actions = [Action.send(S2SHeader.open(from: localDomain!, to: remoteDomain, id: streamID))]
        headerSent = true
        if let (condition, text) = S2SHeader.problem(header, defaultNamespace: defaultNamespace) {
            return actions + streamError(condition, text)
        }
        state = .open
        actions.append(.send("<stream:features>" + features().map { $0.serialized(inheritedNamespace: Namespace.server) }.joined() + "</stream:features>"))
        return actions
    }

    private func features() -> [XMLElement] {
        var features: [XMLElement] = []
        if !tlsActive {
            var starttls = XMLElement(name: "starttls", namespace: Namespace.tls)
            if settings.requireTLS { starttls.append(XMLElement(name: "required", namespace: Namespace.tls)) }
            features.append(starttls)
            if settings.requireTLS { return features }
        }
        if tlsActive, !saslDone, let remoteDomain, peerIdentity?.covers(remoteDomain) == true {
            var mechanisms = XMLElement(name: "mechanisms", namespace: Namespace.sasl)
            mechanisms.append(XMLElement(name: "mechanism", namespace: Namespace.sasl).with(text: "EXTERNAL"))
            features.append(mechanisms)
        }
        if settings.dialback {
            var dialback = XMLElement(name: "dialback", namespace: DialbackNamespace.feature)
            dialback.append(XMLElement(name: "errors", namespace: DialbackNamespace.feature))
            features.append(dialback)
        }
        if settings.bidi && !saslDone && authenticated.isEmpty {
            features.append(XMLElement(name: "bidi", namespace: BidiNamespace.feature))
        }
        return features
    }

    public mutating func elementReceived(_ element: XMLElement) -> [Action] {
        switch state {
        case .open: break
        case .awaitingHeader: return streamError(.notWellFormed, "element before stream header")
        case .closed: return []
        }
        switch (element.namespace, element.name) {
        case (Namespace.tls, "starttls"):
            guard !tlsActive else { return streamError(.policyViolation, "TLS is already in place") }
            tlsActive = true
            state = .awaitingHeader
            return [.send("<proceed xmlns='\(Namespace.tls)'/>"), .startTLS]
        case (Namespace.sasl, "auth"):
            return external(element)
        case (BidiNamespace.request, "bidi"):
            // XEP-0288 §2.2: asked for before authentication; nothing is said back.
            guard settings.bidi, authenticated.isEmpty else { return streamError(.unsupportedStanzaType, "bidirectional streams are asked for before authenticating") }
            bidiRequested = true
            return []
        case (DialbackNamespace.stream, "result"):
            return dialbackResult(element)
        case (DialbackNamespace.stream, "verify"):
            return dialbackVerify(element)
        case (Namespace.server, "message"), (Namespace.server, "presence"), (Namespace.server, "iq"):
            return stanza(element)
        default:
            return streamError(.unsupportedStanzaType, "<\(element.name)/> in \(element.namespace) is not understood here")
        }
    }

    /// SASL EXTERNAL (XEP-0178): the certificate must cover the domain the header named (or the authzid).
    private mutating func external(_ auth: XMLElement) -> [Action] {
        let failure = { (condition: String) -> [Action] in
            [.send("<failure xmlns='\(Namespace.sasl)'><\(condition)/></failure>")]
        }
        guard auth[attribute: "mechanism"] == "EXTERNAL", tlsActive, !saslDone else { return failure("invalid-mechanism") }
        let payload = auth.text.trimmingCharacters(in: .whitespacesAndNewlines)
        var authzid = remoteDomain
        if !payload.isEmpty && payload != "=" {
            guard let data = Data(base64Encoded: payload), let name = String(data: data, encoding: .utf8) else { return failure("incorrect-encoding") }
            authzid = name
        }
        guard let domain = authzid, let localDomain, domain == remoteDomain || remoteDomain == nil, peerIdentity?.covers(domain) == true else {
            return failure("not-authorized")
        }
        saslDone = true
        remoteDomain = domain
        let pair = DomainPair(local: localDomain, remote: domain)
        authenticated.insert(pair)
        state = .awaitingHeader
        // Admission (limits) first: a refused peer must not hear success.
        return [.authenticated(pair, method: "SASL EXTERNAL"), .send("<success xmlns='\(Namespace.sasl)'/>"), .resetParser]
            + (bidiRequested ? [.bidirectional(pair)] : [])
    }

    private mutating func dialbackResult(_ element: XMLElement) -> [Action] {
        guard settings.dialback else { return streamError(.unsupportedStanzaType, "dialback is not enabled here") }
        guard tlsActive || !settings.requireTLS else { return streamError(.policyViolation, "TLS is required before dialback") }
        guard let from = element[attribute: "from"].flatMap({ JID($0) }), from.localpart == nil, from.resourcepart == nil else {
            return streamError(.invalidFrom, "dialback needs a 'from' domain")
        }
        guard let to = element[attribute: "to"].flatMap({ JID($0) }), settings.serves(to.domainpart) else {
            // XEP-0220 §2.4.2: an error result for an unknown target, the stream carries on.
            return [.send(S2SHeader.dialback("result", from: element[attribute: "to"] ?? "", to: from.domainpart, type: "error", error: .itemNotFound))]
        }
        let key = element.text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !key.isEmpty else { return streamError(.badFormat, "a dialback request carries a key") }
        let request = DialbackRequest(pair: DomainPair(local: to.domainpart, remote: from.domainpart), key: key, streamID: streamID)
        if authenticated.contains(request.pair) {
            return [.send(S2SHeader.dialback("result", from: to.domainpart, to: from.domainpart, type: "valid"))]
        }
        guard pending.insert(request).inserted else { return [] }
        return [.verifyDialback(request)]
    }

    /// The authoritative server's answer for a key this stream's peer gave.
    public mutating func dialbackVerified(_ request: DialbackRequest, _ outcome: DialbackOutcome) -> [Action] {
        guard !isClosed, pending.remove(request) != nil else { return [] }
        let pair = request.pair
        switch outcome {
        case .valid:
            authenticated.insert(pair)
            return [.authenticated(pair, method: "dialback"), .send(S2SHeader.dialback("result", from: pair.local, to: pair.remote, type: "valid"))]
                + (bidiRequested ? [.bidirectional(pair)] : [])
        case .invalid:
            return [.send(S2SHeader.dialback("result", from: pair.local, to: pair.remote, type: "invalid"))]
                + streamError(.notAuthorized, "the dialback key for \(pair.remote) is not valid")
        case .error(let condition):
            return [.send(S2SHeader.dialback("result", from: pair.local, to: pair.remote, type: "error", error: condition))]
        }
    }

    /// We are the authoritative server: is this a key one of our outgoing streams gave out?
    private mutating func dialbackVerify(_ element: XMLElement) -> [Action] {
        guard let receiving = element[attribute: "from"], let originating = element[attribute: "to"], let id = element[attribute: "id"] else {
            return streamError(.badFormat, "<db:verify/> needs from, to and id")
        }
        guard settings.serves(originating) else {
            return [.send(S2SHeader.dialback("verify", from: originating, to: receiving, type: "invalid", id: id))]
        }
        let valid = keys.verify(element.text, receiving: receiving, originating: originating, streamID: id)
        return [.send(S2SHeader.dialback("verify", from: originating, to: receiving, type: valid ? "valid" : "invalid", id: id))]
    }

    private mutating func stanza(_ stanza: XMLElement) -> [Action] {
        guard let fromText = stanza[attribute: "from"], let toText = stanza[attribute: "to"] else {
            return streamError(.improperAddressing, "stanzas between servers need 'from' and 'to'")
        }
        guard let from = JID(fromText) else { return streamError(.invalidFrom, "'\(fromText)' is not a JID") }
        guard let to = JID(toText) else { return streamError(.improperAddressing, "'\(toText)' is not a JID") }
        guard !authenticated.isEmpty else { return streamError(.notAuthorized, "no domain has authenticated on this stream") }
        guard settings.serves(to.domainpart) else { return streamError(.hostUnknown, "this server does not serve \(to.domainpart)") }
        guard authenticated.contains(DomainPair(local: to.domainpart, remote: from.domainpart)) else {
            return streamError(.invalidFrom, "\(from.domainpart) has not authenticated to \(to.domainpart) on this stream")
        }
        return [.deliver(stanza)]
    }

    public mutating func streamClosed() -> [Action] {
        switch state {
        case .closed: return []
        case .awaitingHeader, .open:
            state = .closed
            return [.send("</stream:stream>"), .close]
        }
    }

    public mutating func parseFailed(_ error: XMLStreamError) -> [Action] {
        switch error {
        case .notWellFormed(let text): return streamError(.notWellFormed, text)
        case .restrictedXML(let text): return streamError(.restrictedXML, text)
        case .stanzaTooLarge(let limit): return streamError(.policyViolation, "stanza larger than \(limit) bytes")
        case .tooDeep(let limit): return streamError(.policyViolation, "elements nested deeper than \(limit)")
        }
    }

    /// Ends the stream with an error (policy, idle timeout, shutdown).
    public mutating func streamError(_ condition: StreamErrorCondition, _ text: String?) -> [Action] {
        if isClosed { return [] }
        var actions: [Action] = []
        if !headerSent {
            actions.append(.send(S2SHeader.open(from: localDomain ?? settings.defaultDomain, to: remoteDomain, id: streamIDGenerator())))
            headerSent = true
        }
        state = .closed
        return actions + [.send(condition.element(text: text) + "</stream:stream>"), .close]
    }
}

// MARK: Outgoing streams

/// What an outgoing stream is for.
public enum S2SPurpose: Equatable, Sendable {
    /// Authenticate `pair.local` to `pair.remote` and carry stanzas.
    case stanzas
    /// Only ask the remote (authoritative) server whether a key is one it gave out (XEP-0220 §2.3).
    case verify(key: String, streamID: String)
}

/// Why an outgoing stream could not be used; stanzas waiting for it are bounced with `condition`.
public struct S2SFailure: Error, Equatable, Sendable, CustomStringConvertible {
    public let condition: StanzaErrorCondition
    public let reason: String
    public init(_ condition: StanzaErrorCondition, _ reason: String) {
        self.condition = condition
        self.reason = reason
    }
    public var description: String { reason }
}

/// An s2s stream we open to another server: TLS, then SASL EXTERNAL when the peer offers it (our
/// certificate satisfied it) or dialback, then stanzas; or a dialback verification only.
public struct S2SOutgoingMachine: S2SStreamMachine {
    public enum Action: Equatable {
        case send(String)
        /// `<proceed/>` arrived: put client TLS under the stream; then call `tlsEstablished()`.
        case startTLS
        case resetParser
        /// Authenticated: stanzas may flow.
        case ready(method: String)
        /// The verification asked for (purpose `.verify`) has its answer.
        case verified(DialbackOutcome)
        /// XEP-0288: a stanza the receiving server sent back on this bidirectional stream, from its domain to ours.
        case deliver(XMLElement)
        /// The stream cannot be used; what waits for it is bounced.
        case failed(S2SFailure)
        case close
    }

    private enum State {
        case awaitingHeader
        case awaitingFeatures
        case awaitingProceed
        case tlsHandshake
        case awaitingSASL
        case awaitingDialbackResult
        case awaitingVerification
        case ready
        case closed
    }

    public let pair: DomainPair
    public let purpose: S2SPurpose
    public let settings: S2SStreamSettings
    private let keys: DialbackKeys
    private var state = State.awaitingHeader
    public private(set) var tlsActive: Bool
    /// The id the receiving server gave its stream (what a dialback key is computed over).
    public private(set) var remoteStreamID: String?
    private var saslDone = false
    private var externalFailed = false
    private var dialbackOffered = false
    /// We asked for a bidirectional stream (XEP-0288): the receiving server may send stanzas back on it.
    public private(set) var bidirectional = false

    public init(pair: DomainPair, purpose: S2SPurpose, settings: S2SStreamSettings, keys: DialbackKeys, tlsActive: Bool = false) {
        self.pair = pair
        self.purpose = purpose
        self.settings = settings
        self.keys = keys
        self.tlsActive = tlsActive
    }

    public var isReady: Bool {
        switch state {
        case .ready: return true
        case .awaitingHeader, .awaitingFeatures, .awaitingProceed, .tlsHandshake, .awaitingSASL, .awaitingDialbackResult, .awaitingVerification, .closed: return false
        }
    }

    /// The connection is up: open the stream.
    public func start() -> [Action] {
        [.send(S2SHeader.open(from: pair.local, to: pair.remote, id: nil))]
    }

    public mutating func streamOpened(header: XMLElement, defaultNamespace: String?) -> [Action] {
        switch state {
        case .awaitingHeader: break
        case .awaitingFeatures, .awaitingProceed, .tlsHandshake, .awaitingSASL, .awaitingDialbackResult, .awaitingVerification, .ready:
            return fail(.undefinedCondition, "\(pair.remote) sent a second stream header", streamError: .notWellFormed)
        case .closed: return []
        }
        if let (condition, text) = S2SHeader.problem(header, defaultNamespace: defaultNamespace) {
            return fail(.remoteServerNotFound, "\(pair.remote): \(text)", streamError: condition)
        }
        remoteStreamID = header[attribute: "id"]
        state = .awaitingFeatures
        return []
    }

    public mutating func elementReceived(_ element: XMLElement) -> [Action] {
        if element.namespace == Namespace.stream && element.name == "error" {
            let condition = element.elements.first { $0.namespace == Namespace.streamErrors && $0.name != "text" }?.name ?? "undefined-condition"
            let text = element.child("text", namespace: Namespace.streamErrors)?.text
            if case .ready = state {
                // The peer ends a working stream (shutting down, idle): nothing waits on it, the next stanza opens another.
                state = .closed
                return [.send("</stream:stream>"), .close]
            }
            return fail(.remoteServerNotFound, "\(pair.remote) ended the stream: \(condition)\(text.map { " (\($0))" } ?? "")", streamError: nil)
        }
        switch state {
        case .awaitingFeatures:
            guard element.namespace == Namespace.stream, element.name == "features" else {
                return fail(.remoteServerNotFound, "\(pair.remote) sent <\(element.name)/> instead of its features", streamError: .notWellFormed)
            }
            return negotiate(element)
        case .awaitingProceed:
            guard element.namespace == Namespace.tls, element.name == "proceed" else {
                return fail(.remoteServerNotFound, "\(pair.remote) refused STARTTLS", streamError: nil)
            }
            state = .tlsHandshake
            return [.startTLS]
        case .awaitingSASL:
            switch (element.namespace, element.name) {
            case (Namespace.sasl, "success"):
                saslDone = true
                state = .awaitingHeader
                return [.resetParser, .send(S2SHeader.open(from: pair.local, to: pair.remote, id: nil))]
            case (Namespace.sasl, "failure"):
                externalFailed = true
                guard settings.dialback, dialbackOffered else {
                    return fail(.remoteServerNotFound, "\(pair.remote) did not accept our certificate (SASL EXTERNAL) and offers no dialback", streamError: nil)
                }
                return sendDialbackKey()
            default:
                return fail(.remoteServerNotFound, "\(pair.remote) answered SASL with <\(element.name)/>", streamError: .notWellFormed)
            }
        case .awaitingDialbackResult:
            guard element.namespace == DialbackNamespace.stream, element.name == "result" else { return [] }
            switch element[attribute: "type"] {
            case "valid":
                state = .ready
                return [.ready(method: "dialback")]
            default:
                return fail(.remoteServerNotFound, "\(pair.remote) did not accept our dialback key (\(element[attribute: "type"] ?? "no type"))", streamError: nil)
            }
        case .awaitingVerification:
            guard element.namespace == DialbackNamespace.stream, element.name == "verify" else { return [] }
            let outcome: DialbackOutcome = element[attribute: "type"] == "valid" ? .valid : .invalid
            state = .closed
            return [.verified(outcome), .send("</stream:stream>"), .close]
        case .ready:
            return stanzaBack(element)
        case .awaitingHeader, .tlsHandshake:
            return fail(.remoteServerNotFound, "\(pair.remote) sent <\(element.name)/> before its stream header", streamError: .notWellFormed)
        case .closed:
            return []
        }
    }

    /// A stanza on a stream we opened: only on a bidirectional one, and only from the domain we
    /// connected to (reached through its DNS, or its verified certificate) to the domain we authenticated as.
    private mutating func stanzaBack(_ stanza: XMLElement) -> [Action] {
        guard bidirectional, [Namespace.server].contains(stanza.namespace), ["message", "presence", "iq"].contains(stanza.name) else {
            return fail(.remoteServerNotFound, "\(pair.remote) sent <\(stanza.name)/> on a stream that is not bidirectional", streamError: .unsupportedStanzaType)
        }
        guard let from = stanza[attribute: "from"].flatMap({ JID($0) }), from.domainpart == pair.remote else {
            return fail(.remoteServerNotFound, "\(pair.remote) sent a stanza from another domain", streamError: .invalidFrom)
        }
        guard let to = stanza[attribute: "to"].flatMap({ JID($0) }), to.domainpart == pair.local else {
            return fail(.remoteServerNotFound, "\(pair.remote) sent a stanza for another domain than \(pair.local)", streamError: .improperAddressing)
        }
        return [.deliver(stanza)]
    }

    private mutating func negotiate(_ features: XMLElement) -> [Action] {
        dialbackOffered = features.child("dialback", namespace: DialbackNamespace.feature) != nil
        var actions: [Action] = []
        if tlsActive, settings.bidi, !bidirectional, purpose == .stanzas, features.child("bidi", namespace: BidiNamespace.feature) != nil {
            // XEP-0288 §2.2: asked for before authenticating, without an answer.
            bidirectional = true
            actions.append(.send("<bidi xmlns='\(BidiNamespace.request)'/>"))
        }
        return actions + negotiateAuthentication(features)
    }

    private mutating func negotiateAuthentication(_ features: XMLElement) -> [Action] {
        if !tlsActive {
            if features.child("starttls", namespace: Namespace.tls) != nil {
                state = .awaitingProceed
                return [.send("<starttls xmlns='\(Namespace.tls)'/>")]
            }
            if settings.requireTLS {
                return fail(.remoteServerNotFound, "\(pair.remote) does not offer TLS, which this server requires", streamError: .policyViolation)
            }
        }
        if case .verify(let key, let streamID) = purpose {
            state = .awaitingVerification
            return [.send(S2SHeader.dialback("verify", from: pair.local, to: pair.remote, id: streamID, key: key))]
        }
        if saslDone {
            state = .ready
            return [.ready(method: "SASL EXTERNAL")]
        }
        let mechanisms = features.child("mechanisms", namespace: Namespace.sasl)?.elements.map(\.text) ?? []
        if tlsActive, !externalFailed, mechanisms.contains("EXTERNAL") {
            state = .awaitingSASL
            let authzid = Data(pair.local.utf8).base64EncodedString()
            return [.send("<auth xmlns='\(Namespace.sasl)' mechanism='EXTERNAL'>\(authzid)</auth>")]
        }
        // Servers from before stream features for dialback existed offer nothing and still do it.
        if settings.dialback && (dialbackOffered || features.elements.isEmpty) {
            return sendDialbackKey()
        }
        return fail(.remoteServerNotFound, "no way to authenticate to \(pair.remote) (it offers neither SASL EXTERNAL for our certificate nor dialback)", streamError: .policyViolation)
    }

    private mutating func sendDialbackKey() -> [Action] {
        guard let streamID = remoteStreamID else {
            return fail(.remoteServerNotFound, "\(pair.remote) gave its stream no id, so dialback cannot work", streamError: .invalidXML)
        }
        state = .awaitingDialbackResult
        let key = keys.key(receiving: pair.remote, originating: pair.local, streamID: streamID)
        return [.send(S2SHeader.dialback("result", from: pair.local, to: pair.remote, key: key))]
    }

    /// The TLS handshake after `<proceed/>` finished: a new stream on top of it. `peerVerified`: the
    /// receiving server's certificate verified for its domain; without dialback nothing else will do.
    public mutating func tlsEstablished(peerVerified: Bool) -> [Action] {
        guard case .tlsHandshake = state else { return [] }
        if !settings.dialback && !peerVerified {
            // No stream is open on the new TLS layer yet: nothing to say, only to close.
            return fail(.remoteServerNotFound, "the certificate of \(pair.remote) does not verify for it, and dialback is off", streamError: nil, farewell: false)
        }
        tlsActive = true
        state = .awaitingHeader
        return [.resetParser, .send(S2SHeader.open(from: pair.local, to: pair.remote, id: nil))]
    }

    public mutating func streamClosed() -> [Action] {
        switch state {
        case .closed: return []
        case .ready:
            state = .closed
            return [.send("</stream:stream>"), .close]
        case .awaitingHeader, .awaitingFeatures, .awaitingProceed, .tlsHandshake, .awaitingSASL, .awaitingDialbackResult, .awaitingVerification:
            return fail(.remoteServerNotFound, "\(pair.remote) closed the stream during negotiation", streamError: nil)
        }
    }

    public mutating func parseFailed(_ error: XMLStreamError) -> [Action] {
        fail(.remoteServerNotFound, "\(pair.remote) sent bad XML: \(error)", streamError: .notWellFormed)
    }

    /// Ends the stream because of something on our side (idle, shutdown); a stream that never became
    /// ready counts as failed.
    public mutating func close(_ condition: StreamErrorCondition?, _ text: String?) -> [Action] {
        switch state {
        case .closed: return []
        case .ready:
            state = .closed
            return [.send((condition?.element(text: text) ?? "") + "</stream:stream>"), .close]
        case .awaitingHeader, .awaitingFeatures, .awaitingProceed, .tlsHandshake, .awaitingSASL, .awaitingDialbackResult, .awaitingVerification:
            return fail(.remoteServerTimeout, text ?? "\(pair.remote) did not finish negotiating", streamError: condition)
        }
    }

    /// - Parameter farewell: end our stream in words (its end tag, after the error if any); false when
    ///   no stream of ours is open to end.
    private mutating func fail(_ condition: StanzaErrorCondition, _ reason: String, streamError: StreamErrorCondition?, farewell: Bool = true) -> [Action] {
        if case .closed = state { return [] }
        let verifying: Bool
        if case .verify = purpose { verifying = true } else { verifying = false }
        state = .closed
        var actions: [Action] = verifying ? [.verified(.error(condition))] : [.failed(S2SFailure(condition, reason))]
        if farewell { actions.append(.send((streamError?.element(text: nil) ?? "") + "</stream:stream>")) }
        actions.append(.close)
        return actions
    }
}
