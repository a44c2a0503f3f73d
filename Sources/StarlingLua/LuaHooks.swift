import Foundation
import NIOConcurrencyHelpers
import NIOPosix
internal import Metrics
import StarlingAPI
import StarlingStorage
import Synchronization

/// The `lua` module: operators' policy scripts, run on named events with a verdict.
///
/// Each thread that runs hooks (the event loops, and the task threads modules route from) gets its own
/// sandboxed state per script the first time it needs one, so hooks never share a state or take a lock.
/// `reload()` loads every script in fresh states first and swaps them in only if all of them load;
/// threads pick the new set up at their next event.
public final class LuaHooks: ServerModule, ReloadableModule, StatusReportingModule {
    public static let descriptor = ModuleDescriptor(
        name: "lua", summary: "Lua hook scripts for policy (spam rules, rate limits, ...), reloadable while running.",
        options: [
            ModuleOptionSpec("scripts", .stringList, default: .stringList([]), doc: "Lua scripts to load, in order; relative paths are relative to the config file."),
            ModuleOptionSpec("fail_closed", .stringList, default: .stringList([]), doc: "Scripts (as listed in scripts) whose failures refuse the stanza instead of letting it pass."),
            ModuleOptionSpec("priority", .integer(-10_000...10_000), default: .integer(500), doc: "Where the scripts run among the modules' hooks (higher first; blocking is 1000, presence 100)."),
            ModuleOptionSpec("instruction_limit", .integer(1_000...100_000_000), default: .integer(1_000_000), doc: "Work one hook call may do before it is stopped: Lua instructions, pattern-matching steps, and the cost of library functions that grow with their input (see examples/lua/README.md)."),
            ModuleOptionSpec("memory_limit", .integer(65_536...1_073_741_824), default: .integer(8_388_608), doc: "Bytes each script's state may allocate (per thread)."),
            ModuleOptionSpec("time_limit_ms", .integer(10...60_000), default: .integer(1_000), doc: "CPU milliseconds one hook call may take before it is stopped, even within its instruction limit."),
            ModuleOptionSpec("watchdog_ms", .integer(1...60_000), default: .integer(50), doc: "A hook call taking longer than this (wall clock) is logged with the script's file and line and counted."),
        ]
    )

    /// The events scripts can hook, with the stanzas they see.
    public static let events = [
        "stanza-in", "message-in", "presence-in", "iq-in",
        "stanza-out", "message-out", "presence-out", "iq-out",
        "message-offline", "session-bound", "session-closed", "authenticate",
        "connect", "login", "login-failed", "user-registered", "access",
        "s2s-in", "s2s-out", "s2s-stream",
        "muc-create", "muc-configure", "muc-join", "muc-message", "muc-private-message", "muc-subject", "muc-nick",
        "muc-moderate", "muc-destroy",
    ]

    private static let inbound = ["message": ["stanza-in", "message-in"], "presence": ["stanza-in", "presence-in"], "iq": ["stanza-in", "iq-in"]]
    private static let outbound = ["message": ["stanza-out", "message-out"], "presence": ["stanza-out", "presence-out"], "iq": ["stanza-out", "iq-out"]]

    /// One loaded set of scripts. Threads compare `number` with their own copy to see a reload.
    final class Generation: Sendable {
        let number: Int
        let scripts: [LuaScript]
        /// Event → (priority, script index), highest priority first, then script order.
        let dispatch: [String: [(priority: Int, script: Int)]]
        /// Some script calls starling.in_roster: only then are rosters loaded at bind.
        let usesRosters: Bool

        init(number: Int, scripts: [LuaScript], handlers: [[String: Set<Int>]]) {
            self.number = number
            self.scripts = scripts
            var dispatch: [String: [(priority: Int, script: Int)]] = [:]
            for (index, registered) in handlers.enumerated() {
                for (event, priorities) in registered {
                    for priority in priorities { dispatch[event, default: []].append((priority, index)) }
                }
            }
            for event in dispatch.keys {
                dispatch[event]!.sort { $0.priority != $1.priority ? $0.priority > $1.priority : $0.script < $1.script }
            }
            self.dispatch = dispatch
            usesRosters = scripts.contains { $0.source.contains("in_roster") }
        }
    }

    private final class ThreadStates: @unchecked Sendable {
        let generation: Generation
        let states: [LuaScriptState]
        init(generation: Generation, states: [LuaScriptState]) {
            self.generation = generation
            self.states = states
        }
    }

    private let host: any ModuleHost
    private let baseDirectory: String
    private let paths: [String]
    private let failClosed: Set<String>
    let priority: Int
    private let limits: LuaLimits
    private let services: LuaServices
    private let current: NIOLockedValueBox<Generation>
    private let currentNumber: Synchronization.Atomic<Int>
    private let perThread = ThreadSpecificVariable<ThreadStates>()

    public init(host: any ModuleHost) throws {
        self.host = host
        baseDirectory = host.service(ServerPaths.self)?.configDirectory ?? FileManager.default.currentDirectoryPath
        paths = host.options.stringList("scripts")
        failClosed = Set(host.options.stringList("fail_closed"))
        priority = host.options.integer("priority")
        limits = LuaLimits(instructions: host.options.integer("instruction_limit"), memory: host.options.integer("memory_limit"),
                           timeLimit: Double(host.options.integer("time_limit_ms")) / 1000,
                           watchdog: Double(host.options.integer("watchdog_ms")) / 1000)
        services = LuaServices(host: host.domain) { [host] level, message in host.log(level, message) }
        for path in failClosed where !paths.contains(path) {
            throw LuaScriptError(message: "lua: fail_closed names \(path), which is not in scripts")
        }
        let generation = try Self.load(paths: paths, failClosed: failClosed, baseDirectory: baseDirectory, limits: limits, services: services, number: 1)
        current = NIOLockedValueBox(generation)
        currentNumber = Synchronization.Atomic(1)
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.hook(.stanzaFromClient, priority: priority) { [self] event in
            run(Self.inbound[event.stanza.name] ?? ["stanza-in"], event.stanza)
        }
        registrar.hook(.stanzaToUser, priority: priority) { [self] event in
            run(Self.outbound[event.stanza.name] ?? ["stanza-out"], event.stanza)
        }
        registrar.hook(.messageUndeliverable, priority: priority) { [self] event in
            run(["message-offline"], event.stanza)
        }
        // Federation: stanzas arriving from and leaving for other domains, and streams with them.
        registrar.hook(.stanzaFromRemote, priority: priority) { [self] event in
            run(["s2s-in"], event.stanza)
        }
        registrar.hook(.stanzaToRemote, priority: priority) { [self] event in
            run(["s2s-out"], event.stanza)
        }
        registrar.hook(.remoteStream, priority: priority) { [self] event in
            var stream = XMLElement(name: "stream", namespace: Namespace.client, attributes: [
                "domain": event.domain, "direction": event.incoming ? "in" : "out",
            ])
            if let address = event.address { stream[attribute: "address"] = address }
            return run(["s2s-stream"], stream)
        }
        // Used when auth.method names this module: a handler returning "allow" accepts the password.
        registrar.authenticator { [self] request in
            let attempt = XMLElement(name: "auth", namespace: Namespace.client, attributes: [
                "username": request.username, "host": request.host, "password": request.password, "address": request.address,
            ])
            return allows("authenticate", attempt)
        }
        // ACL lists of kind lua: a handler returning "allow" puts the subject in the list named event.list.
        registrar.hook(.accessPredicate, priority: priority) { [self] event in
            var subject = XMLElement(name: "access", namespace: Namespace.client, attributes: ["list": event.predicate])
            if let user = event.user { subject[attribute: "jid"] = user.description }
            if let address = event.address { subject[attribute: "address"] = address }
            return allows("access", subject) ? .handled : .pass
        }
        registrar.hook(.connectionOpened, priority: priority) { [self] event in
            run(["connect"], XMLElement(name: "connection", namespace: Namespace.client, attributes: ["address": event.address]))
        }
        registrar.hook(.loginAttempt, priority: priority) { [self] event in
            run(["login"], Self.element(event))
        }
        registrar.hook(.loginFailed, priority: priority) { [self] event in
            _ = run(["login-failed"], Self.element(event))
            return .pass
        }
        registrar.hook(.userRegistered, priority: priority) { [self] event in
            _ = run(["user-registered"], XMLElement(name: "account", namespace: Namespace.client, attributes: ["jid": event.jid.description]))
            return .pass
        }
        // Rosters of accounts with a session here, for starling.in_roster: loaded at bind (or when a
        // session resumes here from another node), kept current from roster changes made here, dropped
        // when the last session goes (or moves to another node, which sees the changes from then on).
        registrar.hook(.sessionBound, priority: priority) { [self] event in
            loadRosterIfUsed(event.jid.bare)
            return .pass
        }
        registrar.hook(.sessionArrived, priority: priority) { [self] event in
            loadRosterIfUsed(event.jid.bare)
            return .pass
        }
        registrar.hook(.rosterChanged, priority: priority) { [self] event in
            services.rosters.withValue(for: event.user) { cached in
                if event.subscription == "remove" { cached?.remove(event.contact) } else { cached?.insert(event.contact) }
            }
            return .pass
        }
        registrar.hook(.sessionClosed, priority: priority - 1) { [self] event in
            forgetRosterWithoutLocalSession(event.jid.bare)
            return .pass
        }
        registrar.hook(.sessionMoved, priority: priority) { [self] event in
            forgetRosterWithoutLocalSession(event.jid.bare)
            return .pass
        }
        registrar.hook(.sessionBound, priority: priority) { [self] event in
            _ = run(["session-bound"], XMLElement(name: "session", namespace: Namespace.client, attributes: ["jid": event.jid.description]))
            return .pass
        }
        registrar.hook(.sessionClosed, priority: priority) { [self] event in
            _ = run(["session-closed"], XMLElement(name: "session", namespace: Namespace.client, attributes: ["jid": event.jid.description]))
            return .pass
        }
        registerMUC(registrar)
    }

    private func loadRosterIfUsed(_ user: JID) {
        guard current.withLockedValue({ $0.usesRosters }), services.rosters[user] == nil, let store = host.service((any RosterStore).self) else { return }
        let rosters = services.rosters
        Task {
            guard let roster = try? await store.roster(of: user) else { return }
            rosters.withValue(for: user) { cached in if cached == nil { cached = Set(roster.items.map(\.jid)) } }
        }
    }

    private func forgetRosterWithoutLocalSession(_ user: JID) {
        if !host.resources(of: user).contains(where: \.isLocal) { services.rosters.removeValue(forKey: user) }
    }

    public var statusCounters: [String: Int] {
        ["calls": services.calls.load(ordering: .relaxed), "failed_calls": services.failedCalls.load(ordering: .relaxed),
         "slow_calls": services.slowCalls.load(ordering: .relaxed)]
    }

    /// Reads every script again, loads them all in fresh states, and swaps them in only if all of them
    /// loaded; otherwise throws the first error and the running scripts stay.
    public func reload() throws -> String {
        let next = currentNumber.load(ordering: .acquiring) + 1
        let generation = try Self.load(paths: paths, failClosed: failClosed, baseDirectory: baseDirectory, limits: limits, services: services, number: next)
        current.withLockedValue { $0 = generation }
        currentNumber.store(next, ordering: .releasing)
        let handlers = generation.dispatch.values.reduce(0) { $0 + $1.count }
        host.log(.info, "lua: reloaded \(paths.count) script(s), \(handlers) handler group(s)")
        return "\(host.domain): \(paths.count) script(s) loaded"
    }

    private static func load(paths: [String], failClosed: Set<String>, baseDirectory: String, limits: LuaLimits,
                             services: LuaServices, number: Int) throws -> Generation {
        var scripts: [LuaScript] = []
        var handlers: [[String: Set<Int>]] = []
        for path in paths {
            let resolved = path.hasPrefix("/") ? path : baseDirectory + "/" + path
            let source: String
            do { source = try String(contentsOfFile: resolved, encoding: .utf8) } catch {
                throw LuaScriptError(message: "lua: cannot read \(resolved): \(error.localizedDescription)")
            }
            let script = LuaScript(path: path, source: source, failClosed: failClosed.contains(path))
            // Loading once here checks syntax and the top level before any thread depends on it.
            let state = try LuaScriptState(script: script, limits: limits, services: services)
            scripts.append(script)
            handlers.append(state.handlers)
        }
        return Generation(number: number, scripts: scripts, handlers: handlers)
    }

    /// This thread's states for the current generation, created when the thread first needs them or
    /// after a reload.
    private func states() -> (Generation, [LuaScriptState])? {
        // The common case reads one atomic and no lock.
        if let local = perThread.currentValue, local.generation.number == currentNumber.load(ordering: .acquiring) {
            return (local.generation, local.states)
        }
        let generation = current.withLockedValue { $0 }
        do {
            let states = try generation.scripts.map { try LuaScriptState(script: $0, limits: limits, services: services) }
            perThread.currentValue = ThreadStates(generation: generation, states: states)
            return (generation, states)
        } catch {
            services.report(script: "lua", "cannot load the scripts on this thread: \(error)")
            return nil
        }
    }

    private func run(_ events: [String], _ stanza: XMLElement) -> HookResult {
        run(events, stanza, tables: []).result
    }

    /// What the scripts decided: the verdict, the tables as the last "modify" left them, a MUC kick.
    struct Outcome {
        var result: HookResult
        var tables: [String: [String: LuaStoredValue]] = [:]
        var kick: String?
    }

    /// One MUC event's handlers (see LuaHooks+MUC.swift).
    func runMUC(_ event: String, _ stanza: XMLElement, tables: [LuaTable]) -> Outcome {
        run([event], stanza, tables: tables)
    }

    private func run(_ events: [String], _ stanza: XMLElement, tables: [LuaTable]) -> Outcome {
        guard let (generation, states) = states() else { return Outcome(result: .pass) }
        var stanza = stanza
        var tables = tables
        var modified = false
        var changedTables: [String: [String: LuaStoredValue]] = [:]
        for event in events {
            guard let entries = generation.dispatch[event] else { continue }
            for entry in entries {
                let state = states[entry.script]
                let verdict = state.call(event: event, priority: entry.priority, stanza: stanza, tables: tables)
                services.calls.add(1, ordering: .relaxed)
                watch(state, event: event)
                switch verdict {
                case .pass, .allow:
                    continue
                case .drop:
                    return Outcome(result: .handled, tables: changedTables)
                case .kick(let reason):
                    return Outcome(result: .handled, tables: changedTables, kick: reason ?? "removed by the room's policy")
                case .error(let condition, let text):
                    return Outcome(result: .reject(StanzaErrorCondition(rawValue: condition) ?? .notAcceptable, text: text), tables: changedTables)
                case .modify(let attributes, let body, let newTables):
                    stanza = Self.apply(attributes: attributes, body: body, to: stanza)
                    modified = true
                    // Later handlers see what earlier ones changed.
                    for (name, fields) in newTables {
                        changedTables[name, default: [:]].merge(fields) { $1 }
                        if let index = tables.firstIndex(where: { $0.name == name }) {
                            tables[index].fields = tables[index].fields.map { (key: $0.key, value: fields[$0.key] ?? $0.value) }
                        }
                    }
                case .failed(let message):
                    services.reportFailure(script: state.script.path, message, reason: state.lastFailure)
                    if state.script.failClosed { return Outcome(result: .reject(.policyViolation, text: nil), tables: changedTables) }
                }
            }
        }
        return Outcome(result: modified ? .modify(stanza) : .pass, tables: changedTables)
    }

    /// The watchdog: a call that took longer than `watchdog_ms` is logged with where it was and counted.
    private func watch(_ state: LuaScriptState, event: String) {
        let (seconds, location) = state.lastCall
        state.calls &+= 1
        if state.calls % LuaServices.sampleEvery == 1 { services.meters(state.script.path).duration.record(duration: .nanoseconds(Int64(seconds * 1e9))) }
        guard seconds > limits.watchdog else { return }
        services.reportSlow(script: state.script.path, event: event, seconds: seconds, location: location, watchdog: limits.watchdog)
    }

    private static func element(_ login: LoginEvent) -> XMLElement {
        XMLElement(name: "login", namespace: Namespace.client, attributes: [
            "username": login.username, "host": login.host, "address": login.address, "mechanism": login.mechanism,
        ])
    }

    /// Runs an event's handlers that decide yes or no (`authenticate`, `access`): the first "allow" says yes;
    /// a failure, anything else or no handler says no (they fail closed).
    private func allows(_ event: String, _ subject: XMLElement) -> Bool {
        guard let (generation, states) = states(), let entries = generation.dispatch[event] else { return false }
        for entry in entries {
            let state = states[entry.script]
            let verdict = state.call(event: event, priority: entry.priority, stanza: subject)
            watch(state, event: event)
            switch verdict {
            case .allow: return true
            case .pass: continue
            case .failed(let message):
                services.reportFailure(script: state.script.path, message, reason: state.lastFailure)
                return false
            case .drop, .error, .modify, .kick: return false
            }
        }
        return false
    }

    private static func apply(attributes: [String: String], body: String?, to stanza: XMLElement) -> XMLElement {
        var result = stanza
        for attribute in stanza.attributes where attributes[attribute.qualifiedName] == nil {
            result[attribute: attribute.qualifiedName] = nil
        }
        for (name, value) in attributes.sorted(by: { $0.key < $1.key }) where result[attribute: name] != value {
            result[attribute: name] = value
        }
        let hadBody = stanza.child("body") != nil
        if hadBody || body != nil {
            result.children.removeAll { if case .element(let child) = $0 { return child.name == "body" } else { return false } }
            if let body {
                var element = XMLElement(name: "body", namespace: stanza.namespace)
                element.children = [.text(body)]
                result.children.insert(.element(element), at: 0)
            }
        }
        return result
    }
}

/// Logging and the shared key/value store behind `starling.*`, one per module instance: every thread's
/// state of a script sees the same values and counters, and they survive reloads.
public final class LuaServices: LuaScriptServices, Sendable {
    private struct Entry: Sendable {
        var value: LuaStoredValue?
        var expires: Double?
        var count = 0
        var windowStart = 0.0
    }

    private let sink: @Sendable (ModuleLogLevel, String) -> Void
    private let entries = ShardedDictionary<String, Entry>()
    /// Roster contacts of local accounts with a session, by bare JID (filled by the lua module).
    public let rosters = ShardedDictionary<JID, Set<JID>>()
    /// Errors are reported at most once per script every few seconds, with how many were suppressed.
    private let lastReport = ShardedDictionary<String, (time: Double, suppressed: Int)>()

    /// The host whose scripts these are, for their metrics.
    private let host: String

    /// `log` receives what scripts log and their errors.
    public init(host: String = "", log: @escaping @Sendable (ModuleLogLevel, String) -> Void) {
        self.host = host
        sink = log
    }

    private static var now: Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    public func log(script: String, level: String, message: String) {
        sink(ModuleLogLevel(rawValue: level) ?? .info, "lua \(script): \(message)")
    }

    public func value(script: String, key: String) -> LuaStoredValue? {
        let now = Self.now
        return entries.withValue(for: script + "\u{0}" + key) { entry in
            if let expires = entry?.expires, expires <= now { entry = nil }
            return entry?.value
        }
    }

    public func setValue(script: String, key: String, value: LuaStoredValue?, ttl: Double?) {
        let now = Self.now
        entries.withValue(for: script + "\u{0}" + key) { entry in
            entry = value.map { Entry(value: $0, expires: ttl.map { now + $0 }) }
        }
    }

    public func increment(script: String, key: String, window: Double) -> Int {
        let now = Self.now
        return entries.withValue(for: script + "\u{1}" + key) { entry in
            var counter = entry ?? Entry(windowStart: now)
            if now - counter.windowStart >= window {
                counter.count = 0
                counter.windowStart = now
            }
            counter.count += 1
            counter.expires = counter.windowStart + window
            entry = counter
            return counter.count
        }
    }

    public func rosterContains(user: String, contact: String) -> Bool? {
        guard let user = JID(user)?.bare, let contact = JID(contact)?.bare, let roster = rosters[user] else { return nil }
        return roster.contains(contact)
    }

    /// Hook calls made; calls stopped or failed (budget, time, memory, errors); and calls the watchdog saw
    /// run long; since start, over every script of this module.
    public let calls = Synchronization.Atomic<Int>(0)

    /// One call in this many has its duration recorded (per thread, so sampling costs no shared write).
    static let sampleEvery = 16

    /// Per script: durations (`starling_lua_call_duration_seconds`, sampled) and failures by reason
    /// (`starling_lua_failures_total`), through swift-metrics (no-ops unless the server serves metrics).
    struct ScriptMeters: Sendable {
        let duration: Metrics.Timer
        let failures: [String: Metrics.Counter]
    }

    private let scriptMeters = Synchronization.Mutex<[String: ScriptMeters]>([:])

    func meters(_ script: String) -> ScriptMeters {
        scriptMeters.withLock { meters in
            if let existing = meters[script] { return existing }
            let dimensions = [("host", host), ("script", script)]
            let made = ScriptMeters(
                duration: Metrics.Timer(label: "starling_lua_call_duration_seconds", dimensions: dimensions),
                failures: Dictionary(uniqueKeysWithValues: ["budget", "time", "memory", "error"].map {
                    ($0, Metrics.Counter(label: "starling_lua_failures_total", dimensions: dimensions + [("reason", $0)]))
                }))
            meters[script] = made
            return made
        }
    }
    public let failedCalls = Synchronization.Atomic<Int>(0)
    public let slowCalls = Synchronization.Atomic<Int>(0)

    /// Counts and logs a failed call (see `report`); `reason` is budget, time, memory or error.
    public func reportFailure(script: String, _ message: String, reason: String = "error") {
        failedCalls.add(1, ordering: .relaxed)
        meters(script).failures[reason]?.increment()
        report(script: script, message)
    }

    /// Counts and logs a call that ran past the watchdog, naming where it was (file:line) when known.
    public func reportSlow(script: String, event: String, seconds: Double, location: String?, watchdog: Double) {
        slowCalls.add(1, ordering: .relaxed)
        let milliseconds = Int((seconds * 1000).rounded())
        log(.warning, key: script + "\u{0}slow", "lua \(location ?? script): a \(event) hook call took \(milliseconds) ms (watchdog: \(Int((watchdog * 1000).rounded())) ms)",
            repeats: "slow calls")
    }

    /// Logs a script failure, at most once per script every 5 seconds (saying how many were not shown).
    public func report(script: String, _ message: String) {
        log(.error, key: script, "lua \(script): \(message)", repeats: "similar errors")
    }

    private func log(_ level: ModuleLogLevel, key: String, _ text: String, repeats: String) {
        let now = Self.now
        let suppressed: Int? = lastReport.withValue(for: key) { last in
            if let previous = last, now - previous.time < 5 {
                last = (previous.time, previous.suppressed + 1)
                return nil
            }
            let count = last?.suppressed ?? 0
            last = (now, 0)
            return count
        }
        guard let suppressed else { return }
        sink(level, text + (suppressed > 0 ? " (\(suppressed) \(repeats) not shown)" : ""))
    }
}
