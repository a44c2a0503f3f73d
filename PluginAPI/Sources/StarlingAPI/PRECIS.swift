import Foundation

/// The string preparation RFC 7622 asks of each JID part: the PRECIS UsernameCaseMapped profile for the
/// localpart, OpaqueString for the resourcepart (RFC 8265), and lowercase/NFC domain names.
///
/// Gaps, stated so nobody relies on them: the bidi rule is not applied, and domain names are kept as
/// U-labels (no punycode conversion), so `xn--` and Unicode spellings of one domain differ.
enum PRECIS {
    enum Failure: Error, Equatable {
        case empty
        case tooLong
        case disallowed(Unicode.Scalar)
    }

    /// UsernameCaseMapped (RFC 8265 §3.3): width mapping, lowercase, NFC, then IdentifierClass.
    static func usernameCaseMapped(_ input: String) throws(Failure) -> String {
        // Fast path: ASCII needs no width mapping or normalization, only lowercasing.
        if input.utf8.allSatisfy({ $0 < 0x80 }) {
            guard !input.isEmpty else { throw .empty }
            if let bad = input.unicodeScalars.first(where: { !(0x21...0x7E).contains($0.value) }) { throw .disallowed(bad) }
            return input.utf8.contains(where: { (0x41...0x5A).contains($0) }) ? input.lowercased() : input
        }
        var mapped = String.UnicodeScalarView()
        for scalar in input.unicodeScalars { mapped.append(contentsOf: widthMapped(scalar)) }
        let prepared = String(mapped).lowercased().precomposedStringWithCanonicalMapping
        guard !prepared.isEmpty else { throw .empty }
        for scalar in prepared.unicodeScalars where !isIdentifierClassValid(scalar) { throw .disallowed(scalar) }
        return prepared
    }

    /// OpaqueString (RFC 8265 §4.2): non-ASCII spaces become U+0020, NFC, then FreeformClass.
    static func opaqueString(_ input: String) throws(Failure) -> String {
        if input.utf8.allSatisfy({ $0 < 0x80 }) {
            guard !input.isEmpty else { throw .empty }
            if let bad = input.unicodeScalars.first(where: { !(0x20...0x7E).contains($0.value) }) { throw .disallowed(bad) }
            return input
        }
        var mapped = String.UnicodeScalarView()
        for scalar in input.unicodeScalars {
            mapped.append(scalar.properties.generalCategory == .spaceSeparator ? " " : scalar)
        }
        let prepared = String(mapped).precomposedStringWithCanonicalMapping
        guard !prepared.isEmpty else { throw .empty }
        for scalar in prepared.unicodeScalars where !isFreeformClassValid(scalar) { throw .disallowed(scalar) }
        return prepared
    }

    /// Fullwidth and halfwidth forms map to their compatibility decomposition (RFC 8265 §3.3.2 step 1).
    private static func widthMapped(_ scalar: Unicode.Scalar) -> [Unicode.Scalar] {
        guard (0xFF00...0xFFEF).contains(scalar.value) || scalar.value == 0x3000 else { return [scalar] }
        return Array(String(scalar).decomposedStringWithCompatibilityMapping.unicodeScalars)
    }

    private static func hasCompatibilityMapping(_ scalar: Unicode.Scalar) -> Bool {
        if scalar.isASCII { return false }
        let s = String(scalar)
        return s.decomposedStringWithCompatibilityMapping != s.decomposedStringWithCanonicalMapping
    }

    private static func isAlwaysDisallowed(_ scalar: Unicode.Scalar) -> Bool {
        let properties = scalar.properties
        switch properties.generalCategory {
        case .control, .unassigned, .surrogate, .privateUse:
            return true
        default:
            break
        }
        if properties.isNoncharacterCodePoint || properties.isDefaultIgnorableCodePoint { return true }
        // Old Hangul Jamo (RFC 8264 §9.9).
        if (0x1100...0x11FF).contains(scalar.value) || (0xA960...0xA97F).contains(scalar.value)
            || (0xD7B0...0xD7FF).contains(scalar.value) {
            return true
        }
        return false
    }

    /// IdentifierClass (RFC 8264 §4.2): letters, digits and printable ASCII; no spaces, symbols,
    /// non-ASCII punctuation or compatibility characters.
    static func isIdentifierClassValid(_ scalar: Unicode.Scalar) -> Bool {
        if (0x21...0x7E).contains(scalar.value) { return true }
        if scalar.isASCII || isAlwaysDisallowed(scalar) || hasCompatibilityMapping(scalar) { return false }
        switch scalar.properties.generalCategory {
        case .lowercaseLetter, .uppercaseLetter, .otherLetter, .decimalNumber, .modifierLetter,
             .nonspacingMark, .spacingMark:
            return true
        default:
            return false
        }
    }

    /// FreeformClass (RFC 8264 §4.3): everything printable except controls, ignorables and unassigned.
    static func isFreeformClassValid(_ scalar: Unicode.Scalar) -> Bool {
        if (0x20...0x7E).contains(scalar.value) { return true }
        if scalar.isASCII { return false }
        return !isAlwaysDisallowed(scalar)
    }
}
