import StarlingAPI

/// Stream error conditions (RFC 6120 §4.9.3).
public enum StreamErrorCondition: String, Sendable, Equatable {
    case badFormat = "bad-format"
    case badNamespacePrefix = "bad-namespace-prefix"
    case conflict
    case connectionTimeout = "connection-timeout"
    case hostGone = "host-gone"
    case hostUnknown = "host-unknown"
    case improperAddressing = "improper-addressing"
    case internalServerError = "internal-server-error"
    case invalidFrom = "invalid-from"
    case invalidNamespace = "invalid-namespace"
    case invalidXML = "invalid-xml"
    case notAuthorized = "not-authorized"
    case notWellFormed = "not-well-formed"
    case policyViolation = "policy-violation"
    case remoteConnectionFailed = "remote-connection-failed"
    case reset
    case resourceConstraint = "resource-constraint"
    case restrictedXML = "restricted-xml"
    case seeOtherHost = "see-other-host"
    case systemShutdown = "system-shutdown"
    case undefinedCondition = "undefined-condition"
    case unsupportedEncoding = "unsupported-encoding"
    case unsupportedFeature = "unsupported-feature"
    case unsupportedStanzaType = "unsupported-stanza-type"
    case unsupportedVersion = "unsupported-version"

    /// `<stream:error>` with this condition and an optional human-readable text; `declaringPrefix` for an
    /// error written outside a `<stream:stream>` element (WebSocket framing).
    public func element(text: String?, declaringPrefix: Bool = false) -> String {
        var out = declaringPrefix ? "<stream:error xmlns:stream='\(Namespace.stream)'>" : "<stream:error>"
        out += "<\(rawValue) xmlns='\(Namespace.streamErrors)'/>"
        if let text {
            out += "<text xmlns='\(Namespace.streamErrors)' xml:lang='en'>"
            XMLElement.escapeText(text, into: &out)
            out += "</text>"
        }
        out += "</stream:error>"
        return out
    }
}
