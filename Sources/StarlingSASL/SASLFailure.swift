/// SASL failure conditions (RFC 6120 §6.5).
public enum SASLFailure: String, Error, Sendable, Equatable {
    case aborted
    case accountDisabled = "account-disabled"
    case credentialsExpired = "credentials-expired"
    case encryptionRequired = "encryption-required"
    case incorrectEncoding = "incorrect-encoding"
    case invalidAuthzid = "invalid-authzid"
    case invalidMechanism = "invalid-mechanism"
    case malformedRequest = "malformed-request"
    case mechanismTooWeak = "mechanism-too-weak"
    case notAuthorized = "not-authorized"
    case temporaryAuthFailure = "temporary-auth-failure"
}

/// The channel binding the TLS layer can offer for SCRAM-*-PLUS (RFC 5929, RFC 9266).
public struct ChannelBinding: Sendable, Equatable {
    /// e.g. `tls-server-end-point` or `tls-exporter`.
    public var type: String
    public var data: [UInt8]

    public init(type: String, data: [UInt8]) {
        self.type = type
        self.data = data
    }
}

/// SASL PLAIN (RFC 4616): `[authzid] NUL authcid NUL password`.
public struct PLAINMessage: Sendable, Equatable {
    public var authzid: String?
    public var username: String
    public var password: String

    public init(parsing bytes: [UInt8]) throws(SASLFailure) {
        let parts = bytes.split(separator: 0, maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[1].isEmpty, !parts[2].isEmpty,
              let authzid = String(validating: parts[0], as: UTF8.self),
              let username = String(validating: parts[1], as: UTF8.self),
              let password = String(validating: parts[2], as: UTF8.self)
        else { throw .malformedRequest }
        self.authzid = authzid.isEmpty ? nil : authzid
        self.username = username
        self.password = password
    }
}
