import Foundation
import Yams

/// A value type a config option can hold, with how to read it from YAML.
public protocol ConfigValue: Sendable {
    /// Shown in errors and the reference ("integer", "string", ...).
    static var typeName: String { get }
    static func decode(_ node: Node) -> Self?
    /// How the default is shown in the reference.
    var configText: String { get }
}

extension Int: ConfigValue {
    public static var typeName: String { "integer" }
    public static func decode(_ node: Node) -> Int? { node.scalar.flatMap { Int($0.string) } }
    public var configText: String { String(self) }
}

extension Double: ConfigValue {
    public static var typeName: String { "number" }
    public static func decode(_ node: Node) -> Double? { node.scalar.flatMap { Double($0.string) } }
    public var configText: String { String(self) }
}

extension Bool: ConfigValue {
    public static var typeName: String { "boolean" }
    public static func decode(_ node: Node) -> Bool? {
        guard let text = node.scalar?.string.lowercased() else { return nil }
        switch text {
        case "true", "yes", "on": return true
        case "false", "no", "off": return false
        default: return nil
        }
    }
    public var configText: String { String(self) }
}

extension String: ConfigValue {
    public static var typeName: String { "string" }
    public static func decode(_ node: Node) -> String? { node.scalar?.string }
    public var configText: String { self.isEmpty ? "\"\"" : self }
}

extension Optional: ConfigValue where Wrapped: ConfigValue {
    public static var typeName: String { Wrapped.typeName }
    public static func decode(_ node: Node) -> Self? {
        if let scalar = node.scalar, scalar.string == "null" || scalar.string == "~" { return .some(nil) }
        return Wrapped.decode(node).map { .some($0) }
    }
    public var configText: String { self?.configText ?? "(none)" }
}

extension Array: ConfigValue where Element: ConfigValue {
    public static var typeName: String { "list of \(Element.typeName)" }
    public static func decode(_ node: Node) -> [Element]? {
        guard let sequence = node.sequence else { return nil }
        var result: [Element] = []
        for item in sequence {
            guard let value = Element.decode(item) else { return nil }
            result.append(value)
        }
        return result
    }
    public var configText: String { "[" + map(\.configText).joined(separator: ", ") + "]" }
}

/// One option: its key within its section, type, default, bounds and documentation, declared once.
/// Reading it (`ConfigSection.read`) enforces all of them.
public struct ConfigOption<Value: ConfigValue>: Sendable {
    public let key: String
    public let defaultValue: Value
    public let doc: String
    /// Returns an error message when the value is out of bounds.
    public let validate: @Sendable (Value) -> String?

    public init(_ key: String, default defaultValue: Value, doc: String, validate: @escaping @Sendable (Value) -> String? = { _ in nil }) {
        self.key = key
        self.defaultValue = defaultValue
        self.doc = doc
        self.validate = validate
    }
}

extension ConfigOption where Value == Int {
    public init(_ key: String, default defaultValue: Int, range: ClosedRange<Int>, doc: String) {
        self.init(key, default: defaultValue, doc: "\(doc) (\(range.lowerBound)...\(range.upperBound))") { value in
            range.contains(value) ? nil : "\(value) is out of range \(range.lowerBound)...\(range.upperBound)"
        }
    }
}

extension ConfigOption where Value == Double {
    public init(_ key: String, default defaultValue: Double, range: ClosedRange<Double>, doc: String) {
        self.init(key, default: defaultValue, doc: "\(doc) (\(range.lowerBound)...\(range.upperBound))") { value in
            range.contains(value) ? nil : "\(value) is out of range \(range.lowerBound)...\(range.upperBound)"
        }
    }
}

extension ConfigOption where Value == String {
    public init(_ key: String, default defaultValue: String, oneOf choices: [String], doc: String) {
        self.init(key, default: defaultValue, doc: "\(doc) (one of: \(choices.joined(separator: ", ")))") { value in
            choices.contains(value) ? nil : "'\(value)' is not one of: \(choices.joined(separator: ", "))"
        }
    }
}

/// A mapping in the config file being read: hands out option values and remembers which keys were
/// used, so that unknown (misspelt) keys are reported with their line.
public final class ConfigSection {
    public let file: String
    /// Dotted path of this section, for messages ("limits", "listeners[1]").
    public let path: String
    let node: Node?
    private var known: Set<String> = []
    let reference: ConfigReference

    init(file: String, path: String, node: Node?, reference: ConfigReference) {
        self.file = file
        self.path = path
        self.node = node
        self.reference = reference
    }

    private func fullKey(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    private func entry(_ key: String) -> Node? {
        guard let mapping = node?.mapping else { return nil }
        for (name, value) in mapping where name.string == key { return value }
        return nil
    }

    public func error(_ key: String?, _ message: String, at node: Node? = nil) -> ConfigError {
        ConfigError(file: file, line: (node ?? self.node)?.mark?.line, key: key.map(fullKey) ?? (path.isEmpty ? nil : path), message: message)
    }

    /// Reads an option, or its default when absent.
    public func read<Value>(_ option: ConfigOption<Value>) throws(ConfigError) -> Value {
        known.insert(option.key)
        reference.record(key: fullKey(option.key), type: Value.typeName, defaultText: option.defaultValue.configText, doc: option.doc)
        guard let valueNode = entry(option.key) else { return option.defaultValue }
        guard let value = Value.decode(valueNode) else {
            throw error(option.key, "expected \(Value.typeName), found '\(valueNode.string ?? "a \(Self.kind(of: valueNode))")'", at: valueNode)
        }
        if let problem = option.validate(value) { throw error(option.key, problem, at: valueNode) }
        return value
    }

    /// A nested mapping (absent means all defaults).
    public func section(_ key: String, doc: String) throws(ConfigError) -> ConfigSection {
        known.insert(key)
        let child = entry(key)
        if let child, child.mapping == nil, !(child.scalar?.string == "" || child.scalar?.string == "null") {
            throw error(key, "expected a mapping", at: child)
        }
        reference.record(key: fullKey(key), type: "section", defaultText: "", doc: doc)
        return ConfigSection(file: file, path: fullKey(key), node: child?.mapping == nil ? nil : child, reference: reference)
    }

    /// A list of mappings (e.g. listeners); nil when the key is absent.
    public func sections(_ key: String) throws(ConfigError) -> [ConfigSection]? {
        known.insert(key)
        guard let child = entry(key) else { return nil }
        guard let sequence = child.sequence else { throw error(key, "expected a list", at: child) }
        var result: [ConfigSection] = []
        for (index, item) in sequence.enumerated() {
            guard item.mapping != nil else { throw error("\(key)[\(index)]", "expected a mapping", at: item) }
            result.append(ConfigSection(file: file, path: "\(fullKey(key))[\(index)]", node: item, reference: reference))
        }
        return result
    }

    /// Marks `key` as read by hand (its value is not an option's).
    func claim(_ key: String) { known.insert(key) }

    /// Fails on any key that no option claimed: a typo must not silently fall back to a default.
    public func rejectUnknownKeys() throws(ConfigError) {
        guard let mapping = node?.mapping else { return }
        for (name, _) in mapping {
            let key = name.string ?? "?"
            if !known.contains(key) {
                let suggestion = known.sorted().first { Self.editDistance($0, key) <= 2 }.map { " (did you mean '\($0)'?)" } ?? ""
                throw error(key, "unknown option\(suggestion)", at: name)
            }
        }
    }

    private static func kind(of node: Node) -> String {
        switch node {
        case .mapping: return "mapping"
        case .sequence: return "list"
        case .scalar: return "scalar"
        case .alias: return "alias"
        }
    }

    private static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        var row = Array(0...b.count)
        for i in 1...max(a.count, 1) where !a.isEmpty {
            var previous = row[0]
            row[0] = i
            for j in stride(from: 1, through: b.count, by: 1) {
                let current = row[j]
                row[j] = min(row[j] + 1, row[j - 1] + 1, previous + (a[i - 1] == b[j - 1] ? 0 : 1))
                previous = current
            }
        }
        return row[b.count]
    }
}

/// Every option read, in order, so `starling config-reference` can print the documentation that the
/// declarations carry.
public final class ConfigReference {
    public private(set) var entries: [(key: String, type: String, defaultText: String, doc: String)] = []
    private var seen: Set<String> = []

    public init() {}

    func record(key: String, type: String, defaultText: String, doc: String) {
        let normalized = key.replacingOccurrences(of: #"\[\d+\]"#, with: "[]", options: .regularExpression)
        guard seen.insert(normalized).inserted else { return }
        entries.append((normalized, type, defaultText, doc))
    }

    /// One line per option: key, type, default and doc.
    public var text: String {
        entries.map { entry in
            entry.type == "section" ? "\n\(entry.key):  \(entry.doc)"
                : "  \(entry.key)  (\(entry.type), default \(entry.defaultText))\n      \(entry.doc)"
        }.joined(separator: "\n")
    }
}
