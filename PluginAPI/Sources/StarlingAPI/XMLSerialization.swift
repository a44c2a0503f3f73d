extension XMLElement {
    /// Serializes the element. A default namespace declaration is written wherever the element's
    /// namespace differs from `inheritedNamespace` (the namespace in scope at the point of insertion,
    /// e.g. `jabber:client` for a stanza written into a client stream).
    public func serialized(inheritedNamespace: String = "") -> String {
        var out = ""
        out.reserveCapacity(256)
        write(into: &out, inheritedNamespace: inheritedNamespace, declaredPrefixes: [:])
        return out
    }

    /// Serializes the start tag only (used for the stream header, whose end tag comes at stream close).
    public func serializedStartTag(inheritedNamespace: String = "", extraDeclarations: [(prefix: String, namespace: String)] = []) -> String {
        var out = ""
        var prefixes: [String: String] = [:]
        writeStartTag(into: &out, inheritedNamespace: inheritedNamespace, declaredPrefixes: &prefixes, extra: extraDeclarations)
        out += ">"
        return out
    }

    private func writeStartTag(
        into out: inout String,
        inheritedNamespace: String,
        declaredPrefixes: inout [String: String],
        extra: [(prefix: String, namespace: String)] = []
    ) {
        out += "<"
        if let prefix { out += prefix; out += ":" }
        out += name
        for declaration in extra {
            out += " xmlns:\(declaration.prefix)='"
            Self.escapeAttribute(declaration.namespace, into: &out)
            out += "'"
            declaredPrefixes[declaration.prefix] = declaration.namespace
        }
        if let prefix {
            if declaredPrefixes[prefix] != namespace {
                out += " xmlns:\(prefix)='"
                Self.escapeAttribute(namespace, into: &out)
                out += "'"
                declaredPrefixes[prefix] = namespace
            }
        } else if namespace != inheritedNamespace {
            out += " xmlns='"
            Self.escapeAttribute(namespace, into: &out)
            out += "'"
        }
        for attribute in attributes {
            if let prefix = attribute.prefix, prefix != "xml", let ns = attribute.namespace, declaredPrefixes[prefix] != ns {
                out += " xmlns:\(prefix)='"
                Self.escapeAttribute(ns, into: &out)
                out += "'"
                declaredPrefixes[prefix] = ns
            }
            out += " "
            out += attribute.qualifiedName
            out += "='"
            Self.escapeAttribute(attribute.value, into: &out)
            out += "'"
        }
    }

    private func write(into out: inout String, inheritedNamespace: String, declaredPrefixes: [String: String]) {
        var prefixes = declaredPrefixes
        writeStartTag(into: &out, inheritedNamespace: inheritedNamespace, declaredPrefixes: &prefixes)
        if children.isEmpty {
            out += "/>"
            return
        }
        out += ">"
        let defaultNamespace = prefix == nil ? namespace : inheritedNamespace
        for child in children {
            switch child {
            case .element(let element):
                element.write(into: &out, inheritedNamespace: defaultNamespace, declaredPrefixes: prefixes)
            case .text(let text):
                Self.escapeText(text, into: &out)
            }
        }
        out += "</"
        if let prefix { out += prefix; out += ":" }
        out += name
        out += ">"
    }

    /// Escapes character data: `&`, `<` and `>` (the last so that `]]>` can never appear).
    public static func escapeText(_ text: String, into out: inout String) {
        if !text.utf8.contains(where: { $0 == UInt8(ascii: "&") || $0 == UInt8(ascii: "<") || $0 == UInt8(ascii: ">") }) {
            out += text
            return
        }
        for scalar in text.unicodeScalars {
            switch scalar {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            default: out.unicodeScalars.append(scalar)
            }
        }
    }

    /// Escapes an attribute value for single- or double-quoted use.
    public static func escapeAttribute(_ text: String, into out: inout String) {
        let needsEscaping = text.utf8.contains { byte in
            switch byte {
            case UInt8(ascii: "&"), UInt8(ascii: "<"), UInt8(ascii: ">"), UInt8(ascii: "'"), UInt8(ascii: "\""), 0x09, 0x0A, 0x0D: return true
            default: return false
            }
        }
        if !needsEscaping {
            out += text
            return
        }
        for scalar in text.unicodeScalars {
            switch scalar {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "'": out += "&apos;"
            case "\"": out += "&quot;"
            case "\t": out += "&#9;"
            case "\n": out += "&#10;"
            case "\r": out += "&#13;"
            default: out.unicodeScalars.append(scalar)
            }
        }
    }
}
