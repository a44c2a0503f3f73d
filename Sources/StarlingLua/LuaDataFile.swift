import Foundation
private import CLuaSandbox

/// A value of a Lua data file (Prosody's internal storage), as Lua itself read it.
public indirect enum LuaData: Sendable, Equatable {
    case null
    case bool(Bool)
    case integer(Int)
    case number(Double)
    /// The string's bytes (Lua strings are bytes; most are UTF-8 text).
    case string([UInt8])
    /// Key-value pairs in no particular order; the array part has integer keys 1...n.
    case table([LuaDataPair])

    /// The string as UTF-8 text.
    public var text: String? {
        if case .string(let bytes) = self { return String(decoding: bytes, as: UTF8.self) }
        return nil
    }

    public var bytes: [UInt8]? {
        if case .string(let bytes) = self { return bytes }
        return nil
    }

    public var int: Int? {
        switch self {
        case .integer(let value): value
        case .number(let value) where value == value.rounded(): Int(exactly: value)
        default: nil
        }
    }

    /// The value at string key `key` of a table.
    public subscript(key: String) -> LuaData? {
        guard case .table(let pairs) = self else { return nil }
        return pairs.first { $0.key.text == key }?.value
    }

    /// The array part of a table (keys 1, 2, ...), in order.
    public var array: [LuaData] {
        guard case .table(let pairs) = self else { return [] }
        return pairs.compactMap { pair in pair.key.int.map { ($0, pair.value) } }.sorted { $0.0 < $1.0 }.map(\.1)
    }

    /// The entries of a table whose keys are strings, by key.
    public var fields: [(key: String, value: LuaData)] {
        guard case .table(let pairs) = self else { return [] }
        return pairs.compactMap { pair in
            if case .string = pair.key { return (pair.key.text!, pair.value) }
            return nil
        }
    }
}

extension LuaData: Decodable {
    private struct Table: Decodable {
        let t: [[LuaData]]
    }

    /// From the JSON `starling_lua_read_data` writes.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null }
        else if let value = try? container.decode(Bool.self) { self = .bool(value) }
        else if let value = try? container.decode(Int.self) { self = .integer(value) }
        else if let value = try? container.decode(Double.self) { self = .number(value) }
        // Each character U+0000...U+00FF is one byte of the Lua string.
        else if let value = try? container.decode(String.self) { self = .string(value.unicodeScalars.map { UInt8(truncatingIfNeeded: $0.value) }) }
        else {
            let table = try container.decode(Table.self)
            self = .table(table.t.compactMap { $0.count == 2 ? LuaDataPair(key: $0[0], value: $0[1]) : nil })
        }
    }
}

public struct LuaDataPair: Sendable, Equatable {
    public let key: LuaData
    public let value: LuaData
}

public struct LuaDataError: Error, CustomStringConvertible {
    public let description: String
}

/// Reads Lua data files with Lua: `return { ... };` files give the returned value, list files (one
/// `item({ ... });` per entry) the list of entries. Nothing but `item` exists while the file runs, and a
/// file that runs too long is stopped.
public enum LuaDataFile {
    public static func read(path: String, instructionLimit: Int = 100_000_000) throws(LuaDataError) -> LuaData {
        guard let contents = FileManager.default.contents(atPath: path) else { throw LuaDataError(description: "\(path): cannot read") }
        return try parse(contents, name: path, instructionLimit: instructionLimit)
    }

    public static func parse(_ contents: Data, name: String, instructionLimit: Int = 100_000_000) throws(LuaDataError) -> LuaData {
        var failure: UnsafeMutablePointer<CChar>?
        let json: UnsafeMutablePointer<CChar>? = contents.withUnsafeBytes { raw in
            let source = starling_lua_string(data: raw.baseAddress?.assumingMemoryBound(to: CChar.self), length: raw.count)
            return ("@" + name).withCString { starling_lua_read_data(source, $0, Int64(instructionLimit), &failure) }
        }
        guard let json else {
            let message = failure.map { String(cString: $0) } ?? "cannot read"
            free(failure)
            throw LuaDataError(description: message)
        }
        defer { free(json) }
        do { return try JSONDecoder().decode(LuaData.self, from: Data(bytes: json, count: strlen(json))) } catch {
            throw LuaDataError(description: "\(name): unreadable data (\(error))")
        }
    }
}
