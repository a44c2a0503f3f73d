/// A JSON value, as the admin API (`listeners: - type: admin`) passes module commands' arguments and results.
public enum AdminValue: Sendable, Equatable, Codable {
    case null
    case bool(Bool)
    case int(Int)
    case string(String)
    case list([AdminValue])
    case object([String: AdminValue])

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null }
        else if let value = try? container.decode(Bool.self) { self = .bool(value) }
        else if let value = try? container.decode(Int.self) { self = .int(value) }
        else if let value = try? container.decode(String.self) { self = .string(value) }
        else if let value = try? container.decode([AdminValue].self) { self = .list(value) }
        else if let value = try? container.decode([String: AdminValue].self) { self = .object(value) }
        else { throw DecodingError.dataCorruptedError(in: container, debugDescription: "not a JSON value the admin API takes (fractions are not)") }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .int(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        case .list(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }

    public var string: String? { if case .string(let value) = self { value } else { nil } }
    public var bool: Bool? { if case .bool(let value) = self { value } else { nil } }
}

/// Why a module command failed; the admin API answers with the matching HTTP status.
public struct AdminCommandError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable {
        /// The arguments are wrong (400).
        case invalid
        /// What the command names does not exist (404).
        case notFound
        /// It exists already, or is in a state that forbids the command (409).
        case conflict
        /// The module cannot do it now (503), e.g. another cluster node serves it.
        case unavailable
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}

/// Carries out one module command with its JSON arguments. Runs in a task of its own.
public typealias AdminCommandHandler = @Sendable (_ arguments: [String: AdminValue]) async throws(AdminCommandError) -> AdminValue

/// One admin command, as the core keeps it.
public struct AdminCommandRegistration: Sendable {
    public let name: String
    public let doc: String
    public let handler: AdminCommandHandler
}

extension ModuleRegistrar {
    /// Offers `name` to the admin API for this module's host (`POST /api/v1/hosts/{host}/commands/{name}`; some
    /// have their own paths, such as MUC's rooms). Two modules of a host claiming one name fail at start.
    public func adminCommand(_ name: String, doc: String, _ handler: @escaping AdminCommandHandler) {
        addAdminCommand(AdminCommandRegistration(name: name, doc: doc, handler: handler))
    }

    /// The string argument `key`, or an `invalid` error naming it.
    public static func required(_ key: String, in arguments: [String: AdminValue]) throws(AdminCommandError) -> String {
        guard let value = arguments[key]?.string, !value.isEmpty else { throw AdminCommandError(.invalid, "'\(key)' (a string) is required") }
        return value
    }
}
