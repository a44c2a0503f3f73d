private import CLuaSandbox
import Foundation
public import StarlingAPI

/// One Lua hook script as read from disk.
public struct LuaScript: Sendable, Equatable {
    /// The path as configured (used in messages: errors name it with the line).
    public var path: String
    public var source: String
    /// When the script fails (error, budget, memory), refuse the stanza instead of letting it pass.
    public var failClosed: Bool

    public init(path: String, source: String, failClosed: Bool) {
        self.path = path
        self.source = source
        self.failClosed = failClosed
    }
}

/// What one script's handlers decided about a stanza.
public enum LuaVerdict: Equatable, Sendable {
    case pass
    case drop
    case error(condition: String, text: String?)
    /// The handler changed the stanza table: its attributes (all of them, as the script left them), body
    /// (nil when it removed the body), and the fields of the tables the call passed, by table name.
    case modify(attributes: [String: String], body: String?, tables: [String: [String: LuaStoredValue]] = [:])
    /// A MUC message handler removes the sender from the room, with this reason.
    case kick(reason: String?)
    /// An `authenticate` handler accepted the password.
    case allow
    /// The script failed: the message names file and line where Lua knows them.
    case failed(String)
}

/// Limits every script runs under.
public struct LuaLimits: Sendable, Equatable {
    /// Units of work one hook call may do before it is stopped: a VM instruction is one unit, and so is
    /// a step of pattern matching; allocating costs one unit per 32 bytes, and library functions whose
    /// work grows with their arguments (string.rep, table.insert, ...) pay for it before they run.
    public var instructions: Int
    /// Bytes one script's state may allocate.
    public var memory: Int
    /// CPU seconds one hook call may take before it is stopped, whatever the budget says: the last line
    /// (counted from the first check, a thousand instructions into the call).
    public var timeLimit: Double
    /// Wall-clock seconds after which a hook call is reported as slow (it still runs to its end).
    public var watchdog: Double

    public init(instructions: Int = 1_000_000, memory: Int = 8 << 20, timeLimit: Double = 1, watchdog: Double = 0.05) {
        self.instructions = instructions
        self.memory = memory
        self.timeLimit = timeLimit
        self.watchdog = watchdog
    }
}

/// Services a script's `starling.*` functions reach: logging and the per-script key/value store. One per
/// script, shared by that script's states on every thread.
public protocol LuaScriptServices: AnyObject, Sendable {
    func log(script: String, level: String, message: String)
    func value(script: String, key: String) -> LuaStoredValue?
    func setValue(script: String, key: String, value: LuaStoredValue?, ttl: Double?)
    /// Adds one to the counter `key` in the current window of `window` seconds and returns its count.
    func increment(script: String, key: String, window: Double) -> Int
    /// Whether `contact` is on the roster of the local account `user`; nil when that roster is not
    /// known here (the account has no session on this server).
    func rosterContains(user: String, contact: String) -> Bool?
}

public enum LuaStoredValue: Sendable, Equatable {
    case number(Double)
    case string(String)
    case boolean(Bool)
}

/// One script in one sandboxed `lua_State`. Not thread-safe: each thread that runs hooks has its own
/// (see `LuaHooks`), so no lock is taken on the stanza path.
public final class LuaScriptState {
    public let script: LuaScript
    /// Event name → the priorities the script registered handlers at.
    public let handlers: [String: Set<Int>]
    private let sandbox: OpaquePointer
    private let bridge: LuaBridge
    /// How long the last call took, and where it was seen running past the watchdog (file:line), if it did.
    public private(set) var lastCall: (seconds: Double, slowLocation: String?) = (0, nil)
    /// Why the last failed call stopped: budget, time, memory or error.
    public private(set) var lastFailure = "error"
    /// Calls made in this state (it belongs to one thread), for sampling their durations.
    var calls = 0

    /// Opens the sandbox and runs the script's top level. Throws the error (with file and line) if the
    /// script does not compile or its top level fails.
    public init(script: LuaScript, limits: LuaLimits, services: any LuaScriptServices) throws(LuaScriptError) {
        let bridge = LuaBridge(script: script.path, services: services)
        let prelude = Self.prelude
        var error: UnsafeMutablePointer<CChar>?
        var sandboxLimits = starling_lua_limits(instructions: Int64(limits.instructions), memory: limits.memory,
                                                time_limit: limits.timeLimit, watchdog: limits.watchdog)
        let opened: OpaquePointer? = prelude.withCString { preludePointer in
            script.source.withCString { sourcePointer in
                ("@" + script.path).withCString { chunkName in
                    LuaBridge.functionNames.withCStringArray { names in
                        var open = starling_lua_open(
                            function: luaSwiftFunction,
                            context: Unmanaged.passUnretained(bridge).toOpaque(),
                            function_names: names,
                            function_count: Int32(LuaBridge.functionNames.count),
                            prelude: starling_lua_string(data: preludePointer, length: prelude.utf8.count),
                            script: starling_lua_string(data: sourcePointer, length: script.source.utf8.count),
                            chunk_name: chunkName
                        )
                        return starling_lua_sandbox_open(&sandboxLimits, &open, &error)
                    }
                }
            }
        }
        guard let opened else {
            let message = error.map { String(cString: $0) } ?? "the script could not be loaded"
            free(error)
            throw LuaScriptError(message: message)
        }
        self.script = script
        self.bridge = bridge
        sandbox = opened
        var registered: [String: Set<Int>] = [:]
        if let list = starling_lua_sandbox_handlers(opened) {
            for line in String(cString: list).split(separator: "\n") {
                let parts = line.split(separator: " ")
                if parts.count == 2, let priority = Int(parts[1]) { registered[String(parts[0]), default: []].insert(priority) }
            }
            free(list)
        }
        handlers = registered
    }

    deinit {
        starling_lua_sandbox_close(sandbox)
    }

    /// Bytes the state holds now.
    public var memoryInUse: Int { starling_lua_sandbox_memory(sandbox) }

    /// Runs the script's handlers for `event` registered at `priority` on `stanza`, with `tables` as more
    /// fields of the event table (MUC events: `event.room`, `event.occupant`, ...). The stanza is not
    /// copied up front: the sandbox reads the parts a handler looks at, while the call runs.
    public func call(event: String, priority: Int, stanza: XMLElement, tables: [LuaTable] = []) -> LuaVerdict {
        withUnsafePointer(to: stanza) { stanzaPointer in
            event.withLuaString { eventString in
                tables.withLuaTables { luaTables, count in
                    var call = starling_lua_call()
                    call.event = eventString
                    call.priority = Int64(priority)
                    call.read_stanza = readStanzaPart
                    call.stanza = UnsafeRawPointer(stanzaPointer)
                    call.table_count = count
                    call.tables = luaTables
                    defer { starling_lua_call_free(&call) }
                    return invoke(&call, tables: tables)
                }
            }
        }
    }

    private func invoke(_ call: inout starling_lua_call, tables: [LuaTable]) -> LuaVerdict {
        let status = starling_lua_sandbox_invoke(sandbox, &call)
        lastCall = (call.elapsed, call.slow_location.map { String(cString: $0) })
        if status != 0 {
            lastFailure = switch call.stop {
            case STARLING_LUA_STOPPED_BUDGET: "budget"
            case STARLING_LUA_STOPPED_TIME: "time"
            case STARLING_LUA_STOPPED_MEMORY: "memory"
            default: "error"
            }
            let message = call.error.map { String(cString: $0) } ?? "error"
            if call.stop == STARLING_LUA_STOPPED_MEMORY {
                return .failed("\(script.path): memory limit of \(starling_lua_sandbox_memory_cap(sandbox)) bytes reached (\(message))")
            }
            return .failed(message)
        }
        switch call.verdict {
        case 1: return .drop
        case 4: return .allow
        case 5: return .kick(reason: call.text.map { String(cString: $0) })
        case 2: return .error(condition: call.condition.map { String(cString: $0) } ?? "not-acceptable", text: call.text.map { String(cString: $0) })
        case 3:
            var attributes: [String: String] = [:]
            for index in 0..<Int(call.result_attribute_count) {
                guard let name = call.result_attributes[index * 2], let value = call.result_attributes[index * 2 + 1] else { continue }
                attributes[String(cString: name)] = String(cString: value)
            }
            var changed: [String: [String: LuaStoredValue]] = [:]
            var index = 0
            for table in tables {
                var current: [String: LuaStoredValue] = [:]
                for (key, _) in table.fields {
                    defer { index += 1 }
                    guard index < Int(call.result_field_count) else { continue }
                    let field = call.result_fields[index]
                    switch field.kind {
                    case 0: current[key] = .string(field.text.data.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: field.text.length), as: UTF8.self) } ?? "")
                    case 1: current[key] = .number(field.number)
                    case 2: current[key] = .boolean(field.number != 0)
                    default: continue
                    }
                }
                changed[table.name] = current
            }
            return .modify(attributes: attributes, body: call.result_has_body != 0 ? call.result_body.map { String(cString: $0) } : nil, tables: changed)
        default: return .pass
        }
    }

    /// Runs before every script: `starling.hook` and a `print` that logs. It returns the dispatcher the C
    /// side calls and the list of registered handlers; the sandbox keeps both where scripts cannot reach.
    static let prelude = """
        local known = {}
        for _, name in ipairs({\(LuaHooks.events.map { "\"\($0)\"" }.joined(separator: ", "))}) do known[name] = true end
        local handlers, runs, order = {}, {}, 0
        local sort, concat, select, tostring, type, ipairs, pairs, error = table.sort, table.concat, select, tostring, type, ipairs, pairs, error
        function starling.hook(event, priority, fn)
          if type(priority) == "function" then fn, priority = priority, 0 end
          if not known[event] then error("unknown event '" .. tostring(event) .. "'", 2) end
          if type(fn) ~= "function" then error("starling.hook needs a function", 2) end
          if math.type(priority) ~= "integer" then error("the priority must be an integer", 2) end
          order = order + 1
          local list = handlers[event] or {}
          list[#list + 1] = {priority = priority, fn = fn, order = order}
          sort(list, function(a, b)
            if a.priority ~= b.priority then return a.priority > b.priority end
            return a.order < b.order
          end)
          handlers[event] = list
          -- What a call runs: the functions of one event and priority in the order they were registered.
          local priorities = runs[event] or {}
          local functions = priorities[priority] or {}
          functions[#functions + 1] = fn
          priorities[priority] = functions
          runs[event] = priorities
        end
        local log = starling.log
        function print(...)
          local parts = {}
          for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
          log("info", concat(parts, " "))
        end
        local function dispatch(event, priority, stanza)
          local priorities = runs[event]
          local functions = priorities and priorities[priority]
          if not functions then return "pass" end
          local modified = false
          for i = 1, #functions do
            local verdict, a, b = functions[i](stanza)
            if verdict == nil or verdict == "pass" then
            elseif verdict == "modify" then
              modified = true
              if type(a) == "table" then stanza = a end
            elseif verdict == "drop" then return "drop"
            elseif verdict == "allow" then return "allow"
            elseif verdict == "kick" then return "kick", a
            elseif verdict == "error" then return "error", a or "not-acceptable", b
            else
              error("a handler for " .. event .. " returned '" .. tostring(verdict) .. "': expected pass, drop, error, modify, allow or kick", 0)
            end
          end
          if modified then return "modify", stanza end
          return "pass"
        end
        local function handler_list()
          local lines = {}
          for event, list in pairs(handlers) do
            for _, handler in ipairs(list) do lines[#lines + 1] = event .. " " .. handler.priority end
          end
          return concat(lines, "\\n")
        end
        return dispatch, handler_list
        """
}

/// Fields handed to a script beside the stanza: a sub-table of the event (`event.room`), or, with an
/// empty name, fields of the event table itself.
public struct LuaTable: Sendable {
    public var name: String
    public var fields: [(key: String, value: LuaStoredValue)]

    public init(_ name: String, _ fields: [(key: String, value: LuaStoredValue)]) {
        self.name = name
        self.fields = fields
    }
}

public struct LuaScriptError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}

/// The context the C dispatcher hands back to Swift for `starling.*` calls.
final class LuaBridge {
    static let functionNames = ["log", "get", "set", "incr", "now", "in_roster"]

    let script: String
    let services: any LuaScriptServices
    /// Holds a returned string until the C side has pushed it onto the Lua stack.
    private var scratch: [CChar] = []

    init(script: String, services: any LuaScriptServices) {
        self.script = script
        self.services = services
    }

    /// Returns 0, or -1 with the message in `result`; never touches the Lua state.
    fileprivate func call(_ selector: Int32, _ arguments: [String?], _ result: inout starling_lua_value) -> Int32 {
        func argument(_ index: Int) -> String? { index < arguments.count ? arguments[index] : nil }
        switch selector {
        case 0:
            services.log(script: script, level: argument(0) ?? "info", message: argument(1) ?? "")
        case 1:
            guard let key = argument(0) else { return fail("starling.get needs a key", &result) }
            set(services.value(script: script, key: key), &result)
        case 2:
            guard let key = argument(0) else { return fail("starling.set needs a key", &result) }
            let value = argument(1).map { text in Double(text).map(LuaStoredValue.number) ?? .string(text) }
            services.setValue(script: script, key: key, value: value, ttl: argument(2).flatMap(Double.init))
        case 3:
            guard let key = argument(0), let window = argument(1).flatMap(Double.init), window > 0 else {
                return fail("starling.incr needs a key and a window in seconds", &result)
            }
            result.kind = 1
            result.number = Double(services.increment(script: script, key: key, window: window))
        case 4:
            result.kind = 1
            result.number = Date().timeIntervalSince1970
        case 5:
            guard let user = argument(0), let contact = argument(1) else { return fail("starling.in_roster needs a user and a contact", &result) }
            if let known = services.rosterContains(user: user, contact: contact) {
                result.kind = 3
                result.number = known ? 1 : 0
            }
        default:
            return fail("unknown function", &result)
        }
        return 0
    }

    fileprivate func set(_ value: LuaStoredValue?, _ result: inout starling_lua_value) {
        switch value {
        case .number(let number)?:
            result.kind = 1
            result.number = number
        case .boolean(let flag)?:
            result.kind = 3
            result.number = flag ? 1 : 0
        case .string(let text)?:
            scratch = Array(text.utf8CString)
            result.kind = 2
            result.length = text.utf8.count
            result.data = scratch.withUnsafeBufferPointer { UnsafePointer($0.baseAddress!) }
        case nil:
            result.kind = 0
        }
    }

    fileprivate func fail(_ message: String, _ result: inout starling_lua_value) -> Int32 {
        scratch = Array(message.utf8CString)
        result.kind = -1
        result.length = message.utf8.count
        result.data = scratch.withUnsafeBufferPointer { UnsafePointer($0.baseAddress!) }
        return -1
    }
}

/// How the sandbox reads the stanza of the running call (a pointer to an `XMLElement` alive for the call).
private let readStanzaPart: starling_lua_stanza_reader = { stanza, part, index, key, buffer, capacity in
    let element = stanza!.assumingMemoryBound(to: XMLElement.self)
    func copy(_ text: String) -> Int {
        var text = text
        return text.withUTF8 { utf8 in
            if utf8.count <= capacity, let buffer, let source = utf8.baseAddress { memcpy(buffer, source, utf8.count) }
            return utf8.count
        }
    }
    let attributes = 0..<element.pointee.attributes.count
    switch part {
    case STARLING_LUA_STANZA_NAME:
        return copy(element.pointee.name)
    case STARLING_LUA_STANZA_BODY:
        guard let body = element.pointee.child("body") else { return -1 }
        return copy(body.text)
    case STARLING_LUA_STANZA_ATTRIBUTE_COUNT:
        return attributes.count
    case STARLING_LUA_STANZA_ATTRIBUTE_NAME where attributes.contains(Int(index)):
        return copy(element.pointee.attributes[Int(index)].qualifiedName)
    case STARLING_LUA_STANZA_ATTRIBUTE_VALUE where attributes.contains(Int(index)):
        return copy(element.pointee.attributes[Int(index)].value)
    case STARLING_LUA_STANZA_ATTRIBUTE_NAMED:
        // Attribute names are short: as Swift strings they are stored inline and compare without a call.
        let qualifiedName = String(decoding: UnsafeRawBufferPointer(start: key.data, count: key.length), as: UTF8.self)
        for index in attributes where element.pointee.attributes[index].hasQualifiedName(qualifiedName) {
            return copy(element.pointee.attributes[index].value)
        }
        return -1
    default:
        return -1
    }
}

private extension XMLAttribute {
    /// Whether this is the attribute `qualifiedName` (`prefix:name`, or `name`), without building its own.
    func hasQualifiedName(_ qualifiedName: String) -> Bool {
        guard let prefix else { return name == qualifiedName }
        return qualifiedName.utf8.count == prefix.utf8.count + 1 + name.utf8.count && qualifiedName.hasPrefix(prefix)
            && qualifiedName.hasSuffix(name) && qualifiedName.utf8.dropFirst(prefix.utf8.count).first == UInt8(ascii: ":")
    }
}

/// The C dispatcher's way back into Swift. It only converts arguments and results; the Lua state is
/// never touched from Swift here, so no Lua error can unwind through a Swift frame.
private let luaSwiftFunction: starling_lua_swift_function = { context, selector, arguments, count, result in
    let bridge = Unmanaged<LuaBridge>.fromOpaque(context!).takeUnretainedValue()
    var strings: [String?] = []
    for index in 0..<Int(count) {
        let argument = arguments![index]
        strings.append(argument.data.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: argument.length), as: UTF8.self) })
    }
    return bridge.call(selector, strings, &result!.pointee)
}

private extension String {
    /// The string's UTF-8 as a Lua string for the duration of `body`.
    func withLuaString<Result>(_ body: (starling_lua_string) -> Result) -> Result {
        var text = self
        return text.withUTF8 { utf8 in
            utf8.withMemoryRebound(to: CChar.self) { body(starling_lua_string(data: $0.baseAddress, length: $0.count)) }
        }
    }
}

private extension Array where Element == LuaTable {
    /// The tables as C structs for the duration of `body` (no allocation when there are none).
    func withLuaTables<Result>(_ body: (UnsafePointer<starling_lua_table>?, Int32) -> Result) -> Result {
        guard !isEmpty else { return body(nil, 0) }
        // Every string goes into one buffer; the C structs point into it.
        var strings: [String] = []
        for table in self {
            strings.append(table.name)
            for (key, value) in table.fields {
                strings.append(key)
                if case .string(let text) = value { strings.append(text) }
            }
        }
        return strings.withLuaStrings { values in
            var fields: [starling_lua_field] = []
            var shapes: [(name: starling_lua_string, start: Int, count: Int)] = []
            var next = 0
            for table in self {
                let name = values[next]
                next += 1
                let start = fields.count
                for (_, value) in table.fields {
                    var field = starling_lua_field()
                    field.key = values[next]
                    next += 1
                    switch value {
                    case .string:
                        field.kind = 0
                        field.text = values[next]
                        next += 1
                    case .number(let number):
                        field.kind = 1
                        field.number = number
                    case .boolean(let flag):
                        field.kind = 2
                        field.number = flag ? 1 : 0
                    }
                    fields.append(field)
                }
                shapes.append((name, start, table.fields.count))
            }
            return fields.withUnsafeBufferPointer { fieldBuffer in
                let luaTables = shapes.map { shape in
                    starling_lua_table(name: shape.name, field_count: Int32(shape.count), fields: fieldBuffer.baseAddress.map { $0 + shape.start })
                }
                return luaTables.withUnsafeBufferPointer { body($0.baseAddress, Int32(count)) }
            }
        }
    }
}

private extension Array where Element == String {
    /// The strings as C strings for the duration of `body`.
    func withCStringArray<Result>(_ body: (UnsafePointer<UnsafePointer<CChar>?>) -> Result) -> Result {
        let copies = map { strdup($0) }
        defer { copies.forEach { free($0) } }
        let pointers = copies.map { UnsafePointer($0) }
        return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
    }

    /// The strings as (pointer, length) pairs into one buffer, for the duration of `body`.
    func withLuaStrings<Result>(_ body: (UnsafeMutableBufferPointer<starling_lua_string>) -> Result) -> Result {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(reduce(0) { $0 + $1.utf8.count })
        var lengths: [Int] = []
        lengths.reserveCapacity(count)
        for string in self {
            bytes.append(contentsOf: string.utf8)
            lengths.append(string.utf8.count)
        }
        return bytes.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { characters in
                var offset = 0
                var values: [starling_lua_string] = []
                values.reserveCapacity(lengths.count)
                for length in lengths {
                    values.append(starling_lua_string(data: characters.baseAddress.map { $0 + offset }, length: length))
                    offset += length
                }
                return values.withUnsafeMutableBufferPointer { body($0) }
            }
        }
    }
}
