import Foundation

/// Why a string is not a valid JID.
public enum JIDError: Error, Equatable, CustomStringConvertible, Sendable {
    case emptyDomain
    case emptyLocalpart
    case emptyResource
    case localpartTooLong
    case domainTooLong
    case resourceTooLong
    case invalidLocalpart(String)
    case invalidDomain(String)
    case invalidResource(String)

    public var description: String {
        switch self {
        case .emptyDomain: return "the domainpart is empty"
        case .emptyLocalpart: return "the localpart is empty"
        case .emptyResource: return "the resourcepart is empty"
        case .localpartTooLong: return "the localpart is longer than 1023 bytes"
        case .domainTooLong: return "the domainpart is longer than 1023 bytes"
        case .resourceTooLong: return "the resourcepart is longer than 1023 bytes"
        case .invalidLocalpart(let why): return "invalid localpart: \(why)"
        case .invalidDomain(let why): return "invalid domainpart: \(why)"
        case .invalidResource(let why): return "invalid resourcepart: \(why)"
        }
    }
}

/// An XMPP address (RFC 7622), stored in its prepared (canonical) form so that equal addresses compare
/// and hash equal.
public struct JID: Hashable, Sendable, CustomStringConvertible, LosslessStringConvertible {
    public let localpart: String?
    public let domainpart: String
    public let resourcepart: String?

    /// Parses and prepares `string` (RFC 7622 §3.1 split, then each part's profile).
    public init(parsing string: String) throws(JIDError) {
        // '/' and '@' are ASCII, so searching the UTF-8 view finds the same split as searching characters,
        // without grapheme breaking.
        var rest = Substring(string)
        var resource: Substring?
        if let slash = rest.utf8.firstIndex(of: UInt8(ascii: "/")) {
            resource = rest[rest.utf8.index(after: slash)...]
            rest = rest[..<slash]
        }
        var local: Substring?
        if let at = rest.utf8.firstIndex(of: UInt8(ascii: "@")) {
            local = rest[..<at]
            rest = rest[rest.utf8.index(after: at)...]
        }
        try self.init(localpart: local.map(String.init), domainpart: String(rest), resourcepart: resource.map(String.init))
    }

    /// Failable convenience for code that treats a bad address as absent.
    public init?(_ description: String) {
        guard let jid = try? JID(parsing: description) else { return nil }
        self = jid
    }

    public init(localpart: String?, domainpart: String, resourcepart: String? = nil) throws(JIDError) {
        if let localpart {
            guard !localpart.isEmpty else { throw .emptyLocalpart }
            let prepared: String
            do { prepared = try PRECIS.usernameCaseMapped(localpart) } catch {
                throw .invalidLocalpart(Self.explain(error))
            }
            // RFC 7622 §3.3.1: these may not appear even though the profile allows them.
            if let bad = prepared.utf8.first(where: Self.isForbiddenInLocalpart) {
                throw .invalidLocalpart("character '\(Character(Unicode.Scalar(bad)))' is not allowed")
            }
            guard prepared.utf8.count <= 1023 else { throw .localpartTooLong }
            self.localpart = prepared
        } else {
            self.localpart = nil
        }
        self.domainpart = try Self.prepareDomain(domainpart)
        if let resourcepart {
            guard !resourcepart.isEmpty else { throw .emptyResource }
            let prepared: String
            do { prepared = try PRECIS.opaqueString(resourcepart) } catch {
                throw .invalidResource(Self.explain(error))
            }
            guard prepared.utf8.count <= 1023 else { throw .resourceTooLong }
            self.resourcepart = prepared
        } else {
            self.resourcepart = nil
        }
    }

    private init(unchecked localpart: String?, _ domainpart: String, _ resourcepart: String?) {
        self.localpart = localpart
        self.domainpart = domainpart
        self.resourcepart = resourcepart
    }

    private static func explain(_ failure: PRECIS.Failure) -> String {
        switch failure {
        case .empty: return "empty after preparation"
        case .tooLong: return "too long"
        case .disallowed(let scalar): return "character U+\(String(scalar.value, radix: 16, uppercase: true)) is not allowed"
        }
    }

    private static func isForbiddenInLocalpart(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "&"), UInt8(ascii: "'"), UInt8(ascii: "/"), UInt8(ascii: ":"), UInt8(ascii: "<"), UInt8(ascii: ">"), UInt8(ascii: "@"): return true
        default: return false
        }
    }

    private static func prepareDomain(_ input: String) throws(JIDError) -> String {
        if let ascii = try prepareASCIIDomain(input) { return ascii }
        var domain = input
        // Ideographic and fullwidth full stops are label separators too (RFC 5895 / UTS #46 mapping).
        for dot in ["\u{3002}", "\u{FF0E}", "\u{FF61}"] where domain.contains(dot) {
            domain = domain.replacingOccurrences(of: dot, with: ".")
        }
        if domain.hasSuffix(".") { domain.removeLast() }
        guard !domain.isEmpty else { throw .emptyDomain }
        if domain.hasPrefix("[") {
            guard domain.hasSuffix("]"), domain.count > 2,
                  domain.dropFirst().dropLast().allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." })
            else { throw .invalidDomain("malformed IPv6 literal") }
            return domain.lowercased()
        }
        domain = domain.lowercased().precomposedStringWithCanonicalMapping
        guard domain.utf8.count <= 1023 else { throw .domainTooLong }
        for label in domain.split(separator: ".", omittingEmptySubsequences: false) {
            guard !label.isEmpty else { throw .invalidDomain("empty label") }
            guard label.utf8.count <= 63 else { throw .invalidDomain("label longer than 63 bytes") }
            guard !label.hasPrefix("-"), !label.hasSuffix("-") else {
                throw .invalidDomain("label starts or ends with a hyphen")
            }
            for scalar in label.unicodeScalars {
                if scalar.isASCII {
                    let c = Character(scalar)
                    guard c.isLetter || c.isNumber || c == "-" || c == "_" else {
                        throw .invalidDomain("character '\(scalar.escaped(asASCII: true))' is not allowed")
                    }
                } else if !PRECIS.isIdentifierClassValid(scalar) {
                    throw .invalidDomain("character U+\(String(scalar.value, radix: 16, uppercase: true)) is not allowed")
                }
            }
        }
        return domain
    }

    /// The common case without Foundation: an ASCII host name (letters, digits, '-', '_' in dot-separated
    /// labels) only needs lowercasing. nil hands anything else (IPv6 literals, non-ASCII) to the full path.
    private static func prepareASCIIDomain(_ input: String) throws(JIDError) -> String? {
        var bytes = Array(input.utf8)
        guard bytes.allSatisfy({ $0 < 0x80 }), bytes.first != UInt8(ascii: "[") else { return nil }
        var changed = false
        if bytes.last == UInt8(ascii: ".") {
            bytes.removeLast()
            changed = true
        }
        guard !bytes.isEmpty else { throw .emptyDomain }
        guard bytes.count <= 1023 else { throw .domainTooLong }
        var labelStart = 0
        for index in 0...bytes.count {
            if index == bytes.count || bytes[index] == UInt8(ascii: ".") {
                guard index > labelStart else { throw .invalidDomain("empty label") }
                guard index - labelStart <= 63 else { throw .invalidDomain("label longer than 63 bytes") }
                guard bytes[labelStart] != UInt8(ascii: "-"), bytes[index - 1] != UInt8(ascii: "-") else {
                    throw .invalidDomain("label starts or ends with a hyphen")
                }
                labelStart = index + 1
                continue
            }
            switch bytes[index] {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"):
                bytes[index] += 0x20
                changed = true
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
                break
            default:
                throw .invalidDomain("character '\(Unicode.Scalar(bytes[index]).escaped(asASCII: true))' is not allowed")
            }
        }
        return changed ? String(decoding: bytes, as: UTF8.self) : input
    }

    /// The address without its resource.
    public var bare: JID { JID(unchecked: localpart, domainpart, nil) }
    public var isBare: Bool { resourcepart == nil }
    /// The same address with another resource (which must already be valid).
    public func with(resource: String) throws(JIDError) -> JID {
        try JID(localpart: localpart, domainpart: domainpart, resourcepart: resource)
    }
    /// The domain alone, as a JID.
    public var domain: JID { JID(unchecked: nil, domainpart, nil) }

    public var description: String {
        var out = ""
        if let localpart { out += localpart; out += "@" }
        out += domainpart
        if let resourcepart { out += "/"; out += resourcepart }
        return out
    }
}
