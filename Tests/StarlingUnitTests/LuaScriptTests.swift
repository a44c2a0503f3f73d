import StarlingAPI
import StarlingLua
import Synchronization
import XCTest

final class LuaScriptTests: XCTestCase {
    private final class Log: Sendable {
        let lines = Mutex<[String]>([])
    }
    private let log = Log()
    private lazy var services = LuaServices { [log] level, message in log.lines.withLock { $0.append("\(level.rawValue): \(message)") } }

    private func load(_ source: String, path: String = "hooks/test.lua", limits: LuaLimits = LuaLimits(instructions: 100_000, memory: 1 << 20)) throws -> LuaScriptState {
        try LuaScriptState(script: LuaScript(path: path, source: source, failClosed: false), limits: limits, services: services)
    }

    private func chat(_ body: String?, from: String = "romeo@example.com/orchard", to: String = "juliet@example.com") -> XMLElement {
        var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["from": from, "to": to, "type": "chat"])
        if let body {
            var element = XMLElement(name: "body", namespace: Namespace.client)
            element.children = [.text(body)]
            message.append(element)
        }
        return message
    }

    func testVerdictsAndPriorities() throws {
        let state = try load("""
        starling.hook("message-in", 10, function(stanza)
          if stanza.body and stanza.body:find("viagra", 1, true) then return "error", "policy-violation", "no spam" end
        end)
        starling.hook("message-in", 20, function(stanza)
          if stanza.attr.to == "blackhole@example.com" then return "drop" end
        end)
        starling.hook("message-in", 5, function(stanza)
          stanza.body = stanza.body and stanza.body:upper()
          stanza.attr["xml:lang"] = "en"
          return "modify"
        end)
        """)
        XCTAssertEqual(state.handlers["message-in"], [5, 10, 20])
        XCTAssertEqual(state.call(event: "message-in", priority: 10, stanza: chat("buy viagra now")), .error(condition: "policy-violation", text: "no spam"))
        XCTAssertEqual(state.call(event: "message-in", priority: 10, stanza: chat("hello")), .pass)
        XCTAssertEqual(state.call(event: "message-in", priority: 20, stanza: chat("x", to: "blackhole@example.com")), .drop)
        XCTAssertEqual(state.call(event: "message-in", priority: 5, stanza: chat("hi")),
                       .modify(attributes: ["from": "romeo@example.com/orchard", "to": "juliet@example.com", "type": "chat", "xml:lang": "en"], body: "HI"))
        XCTAssertEqual(state.call(event: "presence-in", priority: 10, stanza: chat("viagra")), .pass)
    }

    func testTheSandboxHasNoWayOut() throws {
        let state = try load("""
        starling.hook("stanza-in", function(stanza)
          local reachable = {}
          for _, name in ipairs({"io", "os", "require", "load", "loadfile", "dofile", "package", "debug", "collectgarbage"}) do
            if _G[name] ~= nil then reachable[#reachable + 1] = name end
          end
          if string.dump ~= nil then reachable[#reachable + 1] = "string.dump" end
          if #reachable > 0 then return "error", "forbidden", table.concat(reachable, ",") end
        end)
        """)
        XCTAssertEqual(state.call(event: "stanza-in", priority: 0, stanza: chat("x")), .pass)
        // Binary chunks are refused even through the loader the sandbox keeps for itself.
        XCTAssertThrowsError(try load("\u{1B}Lua")) { error in
            XCTAssertTrue("\(error)".contains("attempt to load a binary chunk"), "\(error)")
        }
    }

    func testAnInfiniteLoopIsCutOffWithFileAndLine() throws {
        let state = try load("""
        starling.hook("message-in", function(stanza)
          if stanza.body == "loop" then
            while true do end
          end
        end)
        """, path: "hooks/loop.lua")
        guard case .failed(let message) = state.call(event: "message-in", priority: 0, stanza: chat("loop")) else { return XCTFail("not stopped") }
        XCTAssertTrue(message.contains("hooks/loop.lua:3"), message)
        XCTAssertTrue(message.contains("instruction budget exceeded"), message)
        // The state is still usable.
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("fine")), .pass)
        // So is a top level that never ends: it fails the load, naming the line.
        XCTAssertThrowsError(try load("local n = 0\nwhile true do n = n + 1 end", path: "hooks/top.lua")) { error in
            XCTAssertTrue("\(error)".contains("hooks/top.lua:2"), "\(error)")
        }
    }

    func testAMemoryBombIsContained() throws {
        let state = try load("""
        local hoard = {}
        starling.hook("message-in", function(stanza)
          if stanza.body == "bomb" then
            local s = "x"
            while true do s = s .. s; hoard[#hoard + 1] = s end
          end
        end)
        """, path: "hooks/bomb.lua", limits: LuaLimits(instructions: 10_000_000, memory: 4 << 20))
        guard case .failed(let message) = state.call(event: "message-in", priority: 0, stanza: chat("bomb")) else { return XCTFail("not stopped") }
        XCTAssertTrue(message.contains("memory"), message)
        XCTAssertLessThanOrEqual(state.memoryInUse, 4 << 20)
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("fine")), .pass)
    }

    func testRuntimeErrorsNameFileAndLine() throws {
        let state = try load("""
        starling.hook("message-in", function(stanza)
          return stanza.body.length + 1
        end)
        """, path: "hooks/broken.lua")
        guard case .failed(let message) = state.call(event: "message-in", priority: 0, stanza: chat(nil)) else { return XCTFail("no error") }
        XCTAssertTrue(message.hasPrefix("hooks/broken.lua:2:"), message)
        XCTAssertThrowsError(try load("starling.hook('message-in', function() end", path: "hooks/syntax.lua")) { error in
            XCTAssertTrue("\(error)".hasPrefix("hooks/syntax.lua:1:"), "\(error)")
        }
        XCTAssertThrowsError(try load("starling.hook('no-such-event', function() end)", path: "hooks/event.lua")) { error in
            XCTAssertTrue("\(error)".contains("hooks/event.lua:1: unknown event 'no-such-event'"), "\(error)")
        }
        let wrong = try load("starling.hook('message-in', function() return 'maybe' end)", path: "hooks/verdict.lua")
        guard case .failed(let verdict) = wrong.call(event: "message-in", priority: 0, stanza: chat("x")) else { return XCTFail("accepted") }
        XCTAssertTrue(verdict.contains("expected pass, drop, error, modify, allow or kick"), verdict)
    }

    func testStateCountersAndLoggingAreSharedByEveryStateOfAScript() throws {
        let source = """
        starling.hook("message-in", function(stanza)
          local count = starling.incr("sent:" .. stanza.attr.from, 60)
          starling.set("last", stanza.body)
          if count > 3 then
            print("rate limit for", stanza.attr.from)
            return "error", "resource-constraint", "slow down"
          end
        end)
        starling.hook("message-out", function(stanza)
          if starling.get("last") == "remember me" then return "drop" end
        end)
        """
        // Two states of the same script, as two threads would have.
        let first = try load(source, path: "hooks/rate.lua")
        let second = try load(source, path: "hooks/rate.lua")
        for state in [first, second, first] {
            XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("hi")), .pass)
        }
        XCTAssertEqual(second.call(event: "message-in", priority: 0, stanza: chat("remember me")),
                       .error(condition: "resource-constraint", text: "slow down"))
        XCTAssertEqual(first.call(event: "message-out", priority: 0, stanza: chat("x")), .drop)
        // Another sender has its own counter.
        XCTAssertEqual(first.call(event: "message-in", priority: 0, stanza: chat("hi", from: "mercutio@example.com/a")), .pass)
        XCTAssertTrue(log.lines.withLock { $0 }.contains("info: lua hooks/rate.lua: rate limit for romeo@example.com/orchard"), "\(log.lines.withLock { $0 })")
    }
}
