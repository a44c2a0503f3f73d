/// A node in a stanza tree: an element or character data.
public enum XMLNode: Sendable, Equatable {
    case element(XMLElement)
    case text(String)
}

/// One XML attribute. `namespace` is set only for prefixed attributes (e.g. `xml:lang`).
public struct XMLAttribute: Sendable, Equatable {
    public var name: String
    public var prefix: String?
    public var namespace: String?
    public var value: String

    public init(name: String, value: String, prefix: String? = nil, namespace: String? = nil) {
        self.name = name
        self.value = value
        self.prefix = prefix
        self.namespace = namespace
    }

    /// `prefix:name`, or `name` when unprefixed.
    public var qualifiedName: String { prefix.map { "\($0):\(name)" } ?? name }
}

/// An XML element with its resolved namespace. Stanzas are trees of these; the tree is a value type so a
/// hook or module can modify its copy without affecting anyone else's.
public struct XMLElement: Sendable, Equatable {
    public static let xmlNamespace = "http://www.w3.org/XML/1998/namespace"

    /// Local name, without prefix.
    public var name: String
    /// Resolved namespace URI (empty for no namespace).
    public var namespace: String
    /// The prefix the element was written with, if any (only kept for serialization).
    public var prefix: String?
    public var attributes: [XMLAttribute]
    public var children: [XMLNode]

    public init(
        name: String,
        namespace: String = "",
        attributes: [String: String] = [:],
        children: [XMLNode] = []
    ) {
        self.name = name
        self.namespace = namespace
        self.prefix = nil
        // Sorted so that construction from a dictionary is deterministic.
        self.attributes = attributes.keys.sorted().map { XMLAttribute(name: $0, value: attributes[$0]!) }
        self.children = children
    }

    public init(name: String, namespace: String, prefix: String?, attributes: [XMLAttribute], children: [XMLNode]) {
        self.name = name
        self.namespace = namespace
        self.prefix = prefix
        self.attributes = attributes
        self.children = children
    }

    // MARK: Attributes

    /// The value of the unprefixed attribute `name` (or `xml:lang` given as "xml:lang").
    public subscript(attribute name: String) -> String? {
        get { attributes.first { $0.qualifiedName == name }?.value }
        set {
            if let index = attributes.firstIndex(where: { $0.qualifiedName == name }) {
                if let newValue { attributes[index].value = newValue } else { attributes.remove(at: index) }
            } else if let newValue {
                if name == "xml:lang" {
                    attributes.append(XMLAttribute(name: "lang", value: newValue, prefix: "xml", namespace: Self.xmlNamespace))
                } else {
                    attributes.append(XMLAttribute(name: name, value: newValue))
                }
            }
        }
    }

    // MARK: Children

    /// Child elements, in document order.
    public var elements: [XMLElement] {
        children.compactMap { if case .element(let e) = $0 { return e } else { return nil } }
    }

    /// The first child element with this name, in `namespace` (or any namespace when nil).
    public func child(_ name: String, namespace: String? = nil) -> XMLElement? {
        for case .element(let e) in children where e.name == name && (namespace == nil || e.namespace == namespace) {
            return e
        }
        return nil
    }

    /// The concatenated character data directly inside this element.
    public var text: String {
        var result = ""
        for case .text(let t) in children { result += t }
        return result
    }

    public mutating func append(_ element: XMLElement) { children.append(.element(element)) }
    public mutating func append(text: String) { children.append(.text(text)) }

    /// Removes every child element with this name and namespace.
    public mutating func removeChildren(_ name: String, namespace: String) {
        children.removeAll { if case .element(let e) = $0 { return e.name == name && e.namespace == namespace } else { return false } }
    }

    /// A copy with one text child.
    public func with(text: String) -> XMLElement {
        var copy = self
        copy.children = [.text(text)]
        return copy
    }
}
