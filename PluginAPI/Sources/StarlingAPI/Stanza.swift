/// Namespaces the core and modules share.
public enum Namespace {
    public static let client = "jabber:client"
    public static let server = "jabber:server"
    public static let stream = "http://etherx.jabber.org/streams"
    public static let streamErrors = "urn:ietf:params:xml:ns:xmpp-streams"
    public static let stanzaErrors = "urn:ietf:params:xml:ns:xmpp-stanzas"
    public static let tls = "urn:ietf:params:xml:ns:xmpp-tls"
    public static let sasl = "urn:ietf:params:xml:ns:xmpp-sasl"
    public static let bind = "urn:ietf:params:xml:ns:xmpp-bind"
    public static let session = "urn:ietf:params:xml:ns:xmpp-session"
    public static let saslChannelBinding = "urn:xmpp:sasl-cb:0"
    public static let ping = "urn:xmpp:ping"
}

/// The three stanza kinds of RFC 6120 §8.
public enum StanzaKind: String, Sendable {
    case message, presence, iq
}

/// Stanza error conditions (RFC 6120 §8.3.3), each with the error type the RFC suggests.
public enum StanzaErrorCondition: String, Sendable, CaseIterable {
    case badRequest = "bad-request"
    case conflict
    case featureNotImplemented = "feature-not-implemented"
    case forbidden
    case gone
    case internalServerError = "internal-server-error"
    case itemNotFound = "item-not-found"
    case jidMalformed = "jid-malformed"
    case notAcceptable = "not-acceptable"
    case notAllowed = "not-allowed"
    case notAuthorized = "not-authorized"
    case policyViolation = "policy-violation"
    case recipientUnavailable = "recipient-unavailable"
    case redirect
    case registrationRequired = "registration-required"
    case remoteServerNotFound = "remote-server-not-found"
    case remoteServerTimeout = "remote-server-timeout"
    case resourceConstraint = "resource-constraint"
    case serviceUnavailable = "service-unavailable"
    case subscriptionRequired = "subscription-required"
    case undefinedCondition = "undefined-condition"
    case unexpectedRequest = "unexpected-request"

    /// The `type` attribute RFC 6120 §8.3.3 gives for this condition.
    public var defaultType: String {
        switch self {
        case .badRequest, .jidMalformed, .notAcceptable, .policyViolation, .redirect: return "modify"
        case .forbidden, .notAuthorized, .registrationRequired, .subscriptionRequired: return "auth"
        case .internalServerError, .conflict, .featureNotImplemented, .gone, .itemNotFound, .notAllowed,
             .remoteServerNotFound, .serviceUnavailable, .undefinedCondition:
            return "cancel"
        case .recipientUnavailable, .remoteServerTimeout, .resourceConstraint, .unexpectedRequest: return "wait"
        }
    }
}

/// A read-only view of a stanza's routing attributes over its element.
public struct Stanza: Sendable {
    public var element: XMLElement

    public init?(_ element: XMLElement) {
        guard StanzaKind(rawValue: element.name) != nil,
              element.namespace == Namespace.client || element.namespace == Namespace.server
        else { return nil }
        self.element = element
    }

    public var kind: StanzaKind { StanzaKind(rawValue: element.name)! }
    public var id: String? { element[attribute: "id"] }
    public var type: String? { element[attribute: "type"] }
    /// The `to` attribute, parsed; nil when absent or malformed (check `rawTo` to tell them apart).
    public var to: JID? { element[attribute: "to"].flatMap { JID($0) } }
    public var from: JID? { element[attribute: "from"].flatMap { JID($0) } }
    public var rawTo: String? { element[attribute: "to"] }
}

/// A stanza error: the RFC's condition, maybe an application-specific condition element beside it
/// (RFC 6120 §8.3.4), and a human-readable text.
public struct StanzaError: Sendable, Equatable {
    public var condition: StanzaErrorCondition
    public var application: XMLElement?
    public var text: String?
    /// Overrides the condition's default `type`.
    public var type: String?

    public init(_ condition: StanzaErrorCondition, application: XMLElement? = nil, text: String? = nil, type: String? = nil) {
        self.condition = condition
        self.application = application
        self.text = text
        self.type = type
    }
}

extension XMLElement {
    /// The error reply to this stanza, with an application-specific condition if `error` has one.
    public func errorReply(_ error: StanzaError) -> XMLElement {
        var reply = errorReply(error.condition, text: error.text, type: error.type)
        if let application = error.application, let index = reply.children.lastIndex(where: {
            if case .element(let element) = $0 { return element.name == "error" } else { return false }
        }), case .element(var element) = reply.children[index] {
            element.append(application)
            reply.children[index] = .element(element)
        }
        return reply
    }

    /// The error reply to this stanza (RFC 6120 §8.3.1): addresses swapped, `type='error'`, original
    /// payload kept for messages and presence, and an `<error/>` child with the condition.
    public func errorReply(_ condition: StanzaErrorCondition, text: String? = nil, type: String? = nil) -> XMLElement {
        var reply = XMLElement(name: name, namespace: namespace)
        reply[attribute: "id"] = self[attribute: "id"]
        reply[attribute: "from"] = self[attribute: "to"]
        reply[attribute: "to"] = self[attribute: "from"]
        reply[attribute: "type"] = "error"
        if name != "iq" {
            reply.children = children.filter { if case .element(let e) = $0 { return e.name != "error" } else { return false } }
        }
        var error = XMLElement(name: "error", namespace: namespace, attributes: ["type": type ?? condition.defaultType])
        error.append(XMLElement(name: condition.rawValue, namespace: Namespace.stanzaErrors))
        if let text {
            error.append(XMLElement(name: "text", namespace: Namespace.stanzaErrors).with(text: text))
        }
        reply.append(error)
        return reply
    }

    /// An IQ result for this IQ request with an optional payload.
    public func iqResult(payload: XMLElement? = nil) -> XMLElement {
        var reply = XMLElement(name: "iq", namespace: namespace)
        reply[attribute: "id"] = self[attribute: "id"]
        reply[attribute: "from"] = self[attribute: "to"]
        reply[attribute: "to"] = self[attribute: "from"]
        reply[attribute: "type"] = "result"
        if let payload { reply.append(payload) }
        return reply
    }
}
