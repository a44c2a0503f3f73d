import Crypto
import Foundation

/// One upload slot (XEP-0363): where a file of a given size and type may be PUT, until when.
public struct UploadSlot: Sendable, Equatable {
    /// The host whose users upload (the second path segment of the URLs).
    public var host: String
    /// 128 random bits: the GET URL is only as private as this.
    public var id: String
    public var filename: String
    public var size: Int
    /// Empty when the client named none.
    public var contentType: String
    /// Seconds since 1970 after which the PUT URL is refused.
    public var expires: Int

    public init(host: String, id: String, filename: String, size: Int, contentType: String, expires: Int) {
        self.host = host
        self.id = id
        self.filename = filename
        self.size = size
        self.contentType = contentType
        self.expires = expires
    }

    /// A new slot id.
    public static func newID() -> String {
        (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
    }

    /// Why a file name cannot be stored (nil when it can): it becomes one path segment on disk and in URLs.
    public static func problem(withFilename name: String) -> String? {
        if name.isEmpty || name == "." || name == ".." { return "the file name is empty" }
        if name.utf8.count > 255 { return "the file name is longer than 255 bytes" }
        if name.contains("/") || name.contains("\\") { return "the file name contains a slash" }
        if name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) { return "the file name contains control characters" }
        return nil
    }
}

/// Signs slots into PUT URLs and checks them again, with a secret the server keeps (shared by every
/// node of a cluster), so any node can accept the upload without having issued the slot.
public struct UploadSlotSigner: Sendable {
    private let secret: [UInt8]
    private var key: SymmetricKey { SymmetricKey(data: secret) }

    public init(secret: [UInt8]) {
        self.secret = secret
    }

    /// `/upload/<host>/<id>/<name>`, the name percent-encoded: the GET URL's path.
    public static func path(of slot: UploadSlot) -> String {
        "/upload/\(slot.host)/\(slot.id)/\(percentEncoded(slot.filename))"
    }

    /// The query string that makes the path a PUT URL: expiry and signature.
    public func putQuery(for slot: UploadSlot) -> String {
        "e=\(slot.expires)&h=\(signature(of: slot))"
    }

    /// Whether `query` (from a PUT to `slot`'s path, with the size and type the PUT declares) carries a valid,
    /// unexpired signature for exactly this slot.
    public func accepts(_ slot: UploadSlot, signature: String, now: Int) -> Bool {
        guard slot.expires >= now, let given = Self.base64URLDecoded(signature) else { return false }
        return HMAC<SHA256>.isValidAuthenticationCode(given, authenticating: Self.message(slot), using: key)
    }

    private func signature(of slot: UploadSlot) -> String {
        let code = HMAC<SHA256>.authenticationCode(for: Self.message(slot), using: key)
        return Data(code).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    private static func message(_ slot: UploadSlot) -> Data {
        Data(["starling-upload-1", slot.host, slot.id, slot.filename, String(slot.size), slot.contentType, String(slot.expires)]
            .joined(separator: "\n").utf8)
    }

    private static func base64URLDecoded(_ text: String) -> Data? {
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.count % 4 != 0 { base64 += "=" }
        return Data(base64Encoded: base64)
    }

    static func percentEncoded(_ segment: String) -> String {
        var allowed = CharacterSet.alphanumerics.intersection(CharacterSet(charactersIn: Unicode.Scalar(0)..<Unicode.Scalar(128)))
        allowed.insert(charactersIn: "-._~")
        return segment.addingPercentEncoding(withAllowedCharacters: allowed) ?? segment
    }
}
