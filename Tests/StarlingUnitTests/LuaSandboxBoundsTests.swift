import Foundation
import CLuaSandbox
import StarlingAPI
import StarlingLua
import Synchronization
import XCTest

/// Every call into a script is bounded, including the time spent in C library functions: backtracking
/// patterns, functions whose work grows with their arguments, and the ways a script could dodge the
/// budget (pcall, finalizers).
final class LuaSandboxBoundsTests: XCTestCase {
    private final class Log: Sendable {
        let lines = Mutex<[String]>([])
    }
    private let log = Log()
    private lazy var services = LuaServices { [log] level, message in log.lines.withLock { $0.append("\(level.rawValue): \(message)") } }

    private func load(_ source: String, path: String = "hooks/test.lua", limits: LuaLimits = LuaLimits()) throws -> LuaScriptState {
        try LuaScriptState(script: LuaScript(path: path, source: source, failClosed: false), limits: limits, services: services)
    }

    private func chat(_ body: String) -> XMLElement {
        var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["from": "a@example.com/r", "to": "b@example.com", "type": "chat"])
        message.append(XMLElement(name: "body", namespace: Namespace.client).with(text: body))
        return message
    }

    /// Issue 19's spam rule, from Tests/Fixtures (a 16 KB body of "buy now now ..." used to hold a thread
    /// for 32 s in it).
    static var spamRule: String {
        get throws {
            let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures")
            return try String(contentsOf: fixtures.appendingPathComponent("backtracking_spam_rule.lua"), encoding: .utf8)
        }
    }

    static var backtrackingBody: String {
        var body = "buy "
        while body.utf8.count < 16_000 { body += "now " }
        return body
    }

    func testABacktrackingPatternIsStoppedWithFileAndLine() throws {
        let state = try load(try Self.spamRule, path: "hooks/spam.lua")
        guard case .failed(let message) = state.call(event: "message-in", priority: 100, stanza: chat(Self.backtrackingBody)) else {
            return XCTFail("the pattern was not stopped")
        }
        XCTAssertTrue(message.hasPrefix("hooks/spam.lua:6: pattern too expensive in string.find"), message)
        // The same rule still works on what it was written for, and the state is usable.
        XCTAssertEqual(state.call(event: "message-in", priority: 100, stanza: chat("buy now, it is cheap!")),
                       .error(condition: "policy-violation", text: "spam"))
        XCTAssertEqual(state.call(event: "message-in", priority: 100, stanza: chat("hello")), .pass)
    }

    func testCheapPatternsWorkOnLongSubjects() throws {
        // The old 16 KB subject cap is gone: the budget bounds the cost instead.
        let state = try load("""
        starling.hook("message-in", function(stanza)
          local body = stanza.body
          local digits = body:match("%d%d%d%d")
          local words = 0
          for _ in body:gmatch("%a+") do words = words + 1 end
          local plain = body:find("needle", 1, true)
          if digits == "2026" and words == 2 and plain then return "drop" end
        end)
        """)
        let body = String(repeating: " ", count: 150_000) + "needle 2026 haystack"
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat(body)), .drop)
    }

    /// Each library function whose work grows with its arguments, called once the way that costs far
    /// more than its one instruction: the call draws that work from the budget first and is stopped,
    /// naming the function and the script's line. Big strings come from the stanza's body and big
    /// lengths from `__len`, which is what the table functions' C loops trust.
    func testEveryCostlyLibraryFunctionDrawsFromTheBudget() throws {
        let cases: [(name: String, code: String)] = [
            ("string.rep", ##"local s = string.rep("", 1e15)"##),
            ("string.rep", ##"local s = ("x"):rep(2e5)"##),
            ("string.byte", ##"local n = select("#", stanza.body:byte(1, -1))"##),
            ("utf8.codepoint", ##"local n = select("#", utf8.codepoint(stanza.body, 1, -1))"##),
            ("utf8.len", ##"local n = utf8.len(stanza.body)"##),
            ("utf8.offset", ##"local n = utf8.offset(stanza.body, -1)"##),
            ("tonumber", ##"local n = tonumber(stanza.body)"##),
            ("string.unpack", ##"local n = select("#", string.unpack(stanza.body, stanza.body))"##),
            ("table.insert", ##"table.insert(long, 1, "x")"##),
            ("table.remove", ##"table.remove(long, 1)"##),
            ("table.unpack", ##"local n = select("#", table.unpack(long))"##),
            ("table.unpack", ##"local n = select("#", table.unpack({}, 1, 1e8))"##),
            ("table.concat", ##"local s = table.concat(long)"##),
            ("table.sort", ##"table.sort(long)"##),
            ("table.move", ##"table.move(long, 1, 1e12, 1)"##),
            ("pattern too expensive in string.match", ##"local x = ("a"):rep(5e3):match("(.*)%1b")"##),
            ("pattern too expensive in string.gsub", ##"local x = ("a "):rep(1e4):gsub("a.-a.-a.-b", "")"##),
            ("pattern too expensive in string.gmatch", ##"for x in ("a "):rep(1e4):gmatch("a.-a.-a.-b") do end"##),
        ]
        let body = String(repeating: "x", count: 600_000)
        for (name, code) in cases {
            let state = try load("""
            local long = setmetatable({}, {__len = function() return 1e9 end})
            starling.hook("message-in", function(stanza)
              \(code)
            end)
            """, path: "hooks/costly.lua", limits: LuaLimits(instructions: 100_000))
            let verdict = state.call(event: "message-in", priority: 0, stanza: chat(body))
            guard case .failed(let message) = verdict else {
                XCTFail("\(name): not stopped (\(verdict)) by `\(code)`")
                continue
            }
            XCTAssertTrue(message.hasPrefix("hooks/costly.lua:3: \(name)") && message.contains("instruction budget"), "\(name): \(message)")
        }
        // Linear work stays cheap: a plain find over the same body is well within the budget.
        let plain = try load("""
        starling.hook("message-in", function(stanza)
          if not stanza.body:find("needle", 1, true) and stanza.body:find("x", 599990, true) then return "drop" end
        end)
        """, limits: LuaLimits(instructions: 100_000))
        XCTAssertEqual(plain.call(event: "message-in", priority: 0, stanza: chat(body)), .drop)
    }

    func testAStoppedCallCannotBeCaughtByTheScript() throws {
        let state = try load("""
        starling.hook("message-in", function(stanza)
          if stanza.body == "loop" then
            while true do pcall(function() while true do end end) end
          elseif stanza.body == "pattern" then
            local s = ("buy now "):rep(2000)
            while true do pcall(string.find, s, "buy.-now.-cheap.-!") end
          end
          return "drop"
        end)
        """, path: "hooks/sly.lua")
        for body in ["loop", "pattern"] {
            guard case .failed(let message) = state.call(event: "message-in", priority: 0, stanza: chat(body)) else {
                return XCTFail("\(body): escaped the budget")
            }
            XCTAssertTrue(message.contains("hooks/sly.lua:") && message.contains("budget"), message)
        }
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("fine")), .drop)
    }

    func testFinalizersAreNotAvailable() throws {
        // Lua runs __gc with hooks switched off, where no budget could stop it.
        XCTAssertThrowsError(try load("setmetatable({}, {__gc = function() while true do end end})", path: "hooks/gc.lua")) { error in
            XCTAssertTrue("\(error)".contains("hooks/gc.lua:1: setmetatable: __gc (finalizers) is not available"), "\(error)")
        }
        // Other metatables work as before.
        let state = try load("""
        local counter = setmetatable({}, {__index = function() return 0 end})
        starling.hook("message-in", function(stanza) if counter.anything == 0 then return "drop" end end)
        """)
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("x")), .drop)
    }

    func testTheScriptCannotReplaceTheDispatcher() throws {
        // The dispatcher and the handler list live where scripts cannot reach: redefining the old global
        // names changes nothing (and a handler list that never returned used to hang the load).
        let state = try load("""
        function __starling_handler_list() while true do end end
        function __starling_dispatch() return "drop" end
        starling.hook("message-in", function(stanza) return "pass" end)
        """)
        XCTAssertEqual(state.handlers["message-in"], [0])
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("x")), .pass)
    }

    func testTheTimeLimitStopsWhatTheBudgetAllows() throws {
        let state = try load("""
        starling.hook("message-in", function(stanza)
          while true do end
        end)
        """, path: "hooks/slow.lua", limits: LuaLimits(instructions: 100_000_000_000, timeLimit: 0.01))
        guard case .failed(let message) = state.call(event: "message-in", priority: 0, stanza: chat("x")) else { return XCTFail("not stopped") }
        XCTAssertEqual(message, "hooks/slow.lua:2: time limit of 10 ms exceeded")
    }

    func testTheWatchdogNotesWhereASlowCallWas() throws {
        let state = try load("""
        starling.hook("message-in", function(stanza)
          local n = 0
          for i = 1, 3e6 do n = n + i end
          return "pass"
        end)
        """, path: "hooks/busy.lua", limits: LuaLimits(instructions: 100_000_000, watchdog: 0.001))
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("x")), .pass)
        XCTAssertGreaterThan(state.lastCall.seconds, 0.001)
        XCTAssertEqual(state.lastCall.slowLocation, "hooks/busy.lua:3")
    }

    /// The bounded pattern functions against Lua's own, on generated patterns and subjects: the same
    /// results and the same errors.
    func testTheBoundedMatcherAgreesWithLuas() throws {
        let source = #"""
        local seed = 12345
        local function random(n)
          seed = (seed * 1103515245 + 12345) % 2147483648
          return seed % n + 1
        end
        local tokens = {"a", "b", "c", "1", " ", ".", "%a", "%d", "%w", "%s", "%A", "%p", "[ab]", "[^a]", "[a-c]",
          "[%d_]", "[]a]", "[^]]", "()", "(", ")", "*", "+", "-", "?", "%b()", "%f[%w]", "%f[%W]", "%1", "%2", "%",
          "[", "$", "^", "%%", "%.", "x"}
        local letters = {"a", "b", "c", "1", "2", " ", "(", ")", "_", "%", "."}
        local function pattern()
          local parts = {}
          if random(4) == 1 then parts[1] = "^" end
          for i = 1, random(5) do parts[#parts + 1] = tokens[random(#tokens)] end
          if random(5) == 1 then parts[#parts + 1] = "$" end
          return table.concat(parts)
        end
        local function subject()
          local parts = {}
          for i = 1, random(14) - 1 do parts[#parts + 1] = letters[random(#letters)] end
          return table.concat(parts)
        end
        local function show(ok, ...)
          local parts = {tostring(ok)}
          for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
          return table.concat(parts, "|")
        end
        local function all(gmatch, s, p, init)
          local found = {}
          for a, b in gmatch(s, p, init) do
            found[#found + 1] = tostring(a) .. "," .. tostring(b)
            if #found > 50 then break end
          end
          return table.concat(found, ";")
        end
        local replacements = {"<%0>", "%1", "%%", "x%2y", "", {a = "A", ["1"] = false}, function(a, b) if a == "b" then return nil end return "[" .. tostring(a) .. "]" end}
        local mismatches, checked = {}, 0
        for round = 1, 10000 do
          local s, p = subject(), pattern()
          local init = random(6) - 3
          local plain = random(8) == 1
          local repl = replacements[random(#replacements)]
          local limit = random(4) == 1 and random(3) or nil
          local cases = {
            {"find", show(pcall(string.find, s, p, init, plain)), show(pcall(bounded.find, s, p, init, plain))},
            {"match", show(pcall(string.match, s, p, init)), show(pcall(bounded.match, s, p, init))},
            {"gmatch", show(pcall(all, string.gmatch, s, p, init)), show(pcall(all, bounded.gmatch, s, p, init))},
            {"gsub", show(pcall(string.gsub, s, p, repl, limit)), show(pcall(bounded.gsub, s, p, repl, limit))},
          }
          for _, case in ipairs(cases) do
            checked = checked + 1
            if case[2] ~= case[3] and #mismatches < 10 then
              mismatches[#mismatches + 1] = case[1] .. "(" .. string.format("%q", s) .. ", " .. string.format("%q", p) .. ", " .. init .. "): lua " .. case[2] .. " / bounded " .. case[3]
            end
          end
        end
        return checked .. " checked\n" .. table.concat(mismatches, "\n")
        """#
        var failed: Int32 = 0
        var limits = starling_lua_limits(instructions: 1_000_000_000, memory: 64 << 20, time_limit: 60, watchdog: 60)
        let output: String = source.withCString { pointer in
            let result = starling_lua_pattern_compare(&limits, starling_lua_string(data: pointer, length: source.utf8.count), &failed)
            defer { free(result) }
            return result.map { String(cString: $0) } ?? "no result"
        }
        XCTAssertEqual(failed, 0, output)
        XCTAssertEqual(output, "40000 checked\n")
    }
}

