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

    /// The stanza is read on demand: what a handler reads, lists, changes or removes behaves as if the whole
    /// stanza had been copied into the table up front.
    func testTheStanzaIsReadOnDemand() throws {
        let state = try load("""
        local kept
        starling.hook("message-in", function(stanza)
          local body = stanza.body
          if body == "read" then
            return "error", "bad-request", table.concat({stanza.name, stanza.attr.from, stanza.attr.to, stanza.attr.type,
              tostring(stanza.attr.id), tostring(stanza.attr["xml:lang"]), tostring(stanza.missing)}, " ")
          elseif body == "list" then
            local keys, attributes = {}, {}
            for key in pairs(stanza) do keys[#keys + 1] = key end
            for key, value in pairs(stanza.attr) do attributes[#attributes + 1] = key .. "=" .. value end
            table.sort(keys)
            table.sort(attributes)
            return "error", "bad-request", table.concat(keys, ",") .. " " .. table.concat(attributes, ",")
          elseif body == "protected" then
            local ok = pcall(setmetatable, stanza, {})
            local ok_attr = pcall(setmetatable, stanza.attr, {})
            return "error", "bad-request", tostring(getmetatable(stanza)) .. " " .. tostring(getmetatable(stanza.attr)) .. " " .. tostring(ok) .. " " .. tostring(ok_attr)
          elseif body == "keep" then
            kept = stanza
            local _ = stanza.attr.to
          elseif body == "kept" then
            -- A stanza kept from an earlier call holds what was filled during that call, not this call's values.
            return "error", "bad-request", tostring(kept.body) .. " " .. tostring(kept.name) .. " " .. tostring(kept.attr.to)
          end
        end)
        starling.hook("message-in", 1, function(stanza)
          -- Changes without reading first: the removals must not come back from the stanza.
          stanza.body = nil
          stanza.attr.type = nil
          stanza.attr.id = "new"
          return "modify"
        end)
        starling.hook("message-in", 2, function(stanza)
          -- Read, then remove: the same.
          local _ = stanza.attr.type .. (stanza.body or "")
          stanza.attr.type = nil
          stanza.body = nil
          return "modify"
        end)
        starling.hook("message-in", 3, function(stanza)
          return "modify"
        end)
        """)
        var message = chat("read")
        message[attribute: "xml:lang"] = "de"
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: message),
                       .error(condition: "bad-request", text: "message romeo@example.com/orchard juliet@example.com chat nil de nil"))
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("list")),
                       .error(condition: "bad-request", text: "attr,body,name from=romeo@example.com/orchard,to=juliet@example.com,type=chat"))
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("protected")),
                       .error(condition: "bad-request", text: "stanza attributes false false"))
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("keep")), .pass)
        XCTAssertEqual(state.call(event: "message-in", priority: 0, stanza: chat("kept", to: "other@example.com")),
                       .error(condition: "bad-request", text: "keep nil nil"))
        let everything: [String: String] = ["from": "romeo@example.com/orchard", "to": "juliet@example.com"]
        XCTAssertEqual(state.call(event: "message-in", priority: 1, stanza: chat("hi")), .modify(attributes: everything.merging(["id": "new"]) { $1 }, body: nil))
        XCTAssertEqual(state.call(event: "message-in", priority: 2, stanza: chat("hi")), .modify(attributes: everything, body: nil))
        XCTAssertEqual(state.call(event: "message-in", priority: 3, stanza: chat("hi")), .modify(attributes: everything.merging(["type": "chat"]) { $1 }, body: "hi"))
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
