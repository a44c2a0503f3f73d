import NIOConcurrencyHelpers
import Logging
import StarlingAPI
import StarlingXML
import StarlingConfig

/// The modules enabled on one host and the dispatch tables built from their registrations. Built
/// once at start and immutable afterwards, so the stanza path reads it without any lock.
final class HostModules: Sendable {
    struct IQEntry: Sendable {
        let module: String
        let target: IQTarget
        let fromRemote: Bool
        let handler: IQHandler
    }

    let domain: String
    let modules: [String: any ServerModule]
    /// What each module registered, in configuration order (kept so one module can be replaced).
    let registrars: [ModuleRegistrar]
    let adapters: [String: ModuleHostAdapter]
    let serverFeatures: [String]
    let accountFeatures: [String]
    let serverIdentities: [DiscoIdentity]
    let accountIdentities: [DiscoIdentity]
    /// disco#items contributions, in configuration order.
    let discoItemProviders: [(provider: DiscoItemsProvider, target: IQTarget)]
    let preAuthStreamFeatures: [XMLElement]
    let boundStreamFeatures: [XMLElement]
    let iqHandlers: [ModuleRegistrar.IQKey: IQEntry]
    /// Per hook name, handlers in the order they run (priority descending, then registration order), each
    /// with its meter when metrics are on.
    let hooks: [String: [(registration: ModuleRegistrar.HookRegistration, meter: HookMeter?)]]
    /// Decides passwords when `auth.method` names a module; nil means the stored SCRAM keys.
    let passwordCheck: PasswordCheck?
    /// Domains modules of this host serve as components.
    let components: [ComponentRegistration]
    /// HTTP handlers by path prefix (`/<prefix>/<host>/…`).
    let httpHandlers: [String: ModuleHTTPHandler]
    /// Module commands for the admin API, by name.
    let adminCommands: [String: AdminCommandRegistration]
    /// Some module looks at stanzas on their way to this host's sessions (`HookPoint.stanzaToUser`).
    let screensDeliveries: Bool

    init(domain: String, modules: [String: any ServerModule], registrars: [ModuleRegistrar], adapters: [String: ModuleHostAdapter],
         authMethod: String) throws {
        self.domain = domain
        if authMethod == "internal" {
            passwordCheck = nil
        } else {
            guard let registrar = registrars.first(where: { $0.module == authMethod }) else {
                throw ModuleError("auth method '\(authMethod)' for \(domain): that module is not running there")
            }
            guard let check = registrar.passwordCheck else {
                throw ModuleError("auth method '\(authMethod)' for \(domain): module '\(authMethod)' does not authenticate")
            }
            passwordCheck = check
        }
        self.modules = modules
        self.registrars = registrars
        self.adapters = adapters
        var server = Set<String>(), account = Set<String>()
        var serverIdentities = Set<DiscoIdentity>(), accountIdentities = Set<DiscoIdentity>()
        var discoItemProviders: [(provider: DiscoItemsProvider, target: IQTarget)] = []
        var iqHandlers: [ModuleRegistrar.IQKey: IQEntry] = [:]
        var hooks: [String: [(registration: ModuleRegistrar.HookRegistration, meter: HookMeter?)]] = [:]
        var preAuth: [XMLElement] = [], bound: [XMLElement] = []
        var components: [ComponentRegistration] = []
        var httpHandlers: [String: (module: String, handler: ModuleHTTPHandler)] = [:]
        var adminCommands: [String: (module: String, command: AdminCommandRegistration)] = [:]
        for registrar in registrars {
            for command in registrar.adminCommands {
                if let existing = adminCommands[command.name] {
                    throw ModuleError("modules '\(existing.module)' and '\(registrar.module)' both offer the admin command '\(command.name)' on \(domain)")
                }
                adminCommands[command.name] = (registrar.module, command)
            }
            components += registrar.components
            for registration in registrar.httpHandlers {
                if let existing = httpHandlers[registration.prefix] {
                    throw ModuleError("modules '\(existing.module)' and '\(registrar.module)' both serve HTTP at /\(registration.prefix)/\(domain)/")
                }
                httpHandlers[registration.prefix] = (registrar.module, registration.handler)
            }
            for (element, phase) in registrar.streamFeatures {
                switch phase {
                case .beforeAuthentication: preAuth.append(element)
                case .afterAuthentication: bound.append(element)
                }
            }
            for (namespace, target) in registrar.features {
                if target != .account { server.insert(namespace) }
                if target != .server { account.insert(namespace) }
            }
            for (identity, target) in registrar.identities {
                if target != .account { serverIdentities.insert(identity) }
                if target != .server { accountIdentities.insert(identity) }
            }
            discoItemProviders += registrar.discoItemProviders
            for registration in registrar.iqHandlers {
                if let existing = iqHandlers[registration.key] {
                    throw ModuleError("modules '\(existing.module)' and '\(registrar.module)' both handle <\(registration.key.name) xmlns='\(registration.key.namespace)'/> \(registration.key.type.rawValue)")
                }
                iqHandlers[registration.key] = IQEntry(module: registrar.module, target: registration.target, fromRemote: registration.fromRemote, handler: registration.handler)
            }
            for hook in registrar.hooks {
                let meter = ServerMetrics.enabled ? HookMeter(host: domain, hook: hook.name, module: registrar.module) : nil
                hooks[hook.name, default: []].append((hook, meter))
            }
        }
        // Stable sort keeps registration order among equal priorities.
        self.hooks = hooks.mapValues { list in
            list.enumerated().sorted { ($0.element.registration.priority, -$0.offset) > ($1.element.registration.priority, -$1.offset) }.map(\.element)
        }
        self.preAuthStreamFeatures = preAuth
        self.boundStreamFeatures = bound
        self.serverFeatures = server.sorted()
        self.accountFeatures = account.sorted()
        self.serverIdentities = serverIdentities.sorted()
        self.accountIdentities = accountIdentities.sorted()
        self.discoItemProviders = discoItemProviders
        self.iqHandlers = iqHandlers
        self.components = components
        self.httpHandlers = httpHandlers.mapValues(\.handler)
        self.adminCommands = adminCommands.mapValues(\.command)
        screensDeliveries = self.hooks[HookPoint<StanzaEvent>.stanzaToUser.name] != nil
    }

    /// Points the modules' hosts at these tables (after they are installed in the router).
    func attachAdapters() {
        for adapter in adapters.values { adapter.tables = self }
    }

    /// Runs the handlers of `point` until one ends propagation. A `.modify` replaces the stanza of a
    /// `StanzaCarryingEvent` for the handlers after it and is what the caller gets if nobody ends propagation.
    func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult {
        guard let handlers = hooks[point.name] else { return .pass }
        var event = event
        var modified: XMLElement?
        let eventType = ObjectIdentifier(Event.self)
        for (registration, meter) in handlers {
            // A handler registered for another event type under the same name does not hear this one.
            guard registration.eventType == eventType else { continue }
            let handler = unsafeDowncast(registration.handler, to: ModuleRegistrar.TypedHookHandler<Event>.self)
            let result = meter?.measure { handler.call(event) } ?? handler.call(event)
            switch result {
            case .pass:
                continue
            case .modify(let stanza):
                guard var carrying = event as? any StanzaCarryingEvent else { continue }
                carrying.stanza = stanza
                event = carrying as! Event
                modified = stanza
            case let result:
                return result
            }
        }
        return modified.map { .modify($0) } ?? .pass
    }
}

struct ModuleError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The `ModuleHost` a module instance sees.
final class ModuleHostAdapter: ModuleHost, @unchecked Sendable {
    let domain: String
    let options: ModuleOptions
    private let logger: Logger
    private let router: Router
    private let services: ServiceDirectory
    /// The host's tables once they are installed (modules are created before their registrations are
    /// known, and a reload installs new ones).
    var tables: HostModules? {
        get { installed.withLockedValue { $0 } }
        set { installed.withLockedValue { $0 = newValue } }
    }
    private let installed = NIOLockedValueBox<HostModules?>(nil)

    init(domain: String, options: ModuleOptions, logger: Logger, router: Router, services: ServiceDirectory) {
        self.domain = domain
        self.options = options
        self.logger = logger
        self.router = router
        self.services = services
    }

    func route(_ stanza: XMLElement) { router.routeFromServer(stanza) }

    func deliver(_ stanza: XMLElement, to recipients: [JID]) { router.deliver(stanza, to: recipients) }

    func resources(of bare: JID) -> [ResourceInfo] {
        router.registry.resourceInfos(of: bare)
    }

    func boundResources() -> [ResourceInfo] {
        router.registry.allResources.filter { $0.jid.domainpart == domain }.map(\.info)
    }

    func setAvailability(of full: JID, available: Bool, priority: Int) {
        router.registry.setAvailability(of: full, available: available, priority: priority)
    }

    func setPresence(_ presence: XMLElement?, of full: JID) {
        router.registry.setPresence(of: full, presence, priority: presence.map(Router.priority) ?? 0)
    }

    func setFlag(_ flag: String, _ on: Bool, for full: JID) {
        router.registry.setFlag(flag, on, for: full)
    }

    func broadcastToCluster(_ message: XMLElement) {
        router.cluster?.broadcast(.module(host: domain, message))
    }

    func isLocal(_ domain: String) -> Bool { router.hosts.contains(domain) }

    func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult {
        router.run(point, event, on: domain)
    }

    func holdReads(of session: JID) -> (any ReadHold)? {
        router.registry.localSession(session)?.holdReads()
    }

    func allows(_ rule: String, user: JID?, address: String?) -> Bool {
        router.allows(rule, AccessSubject(user: user, address: address), on: domain)
    }

    func closeSessions(of bare: JID) {
        router.closeSessions(of: bare.bare, .notAuthorized)
    }

    func service<Service>(_ type: Service.Type) -> Service? { services.lookup(type) }

    func log(_ level: ModuleLogLevel, _ message: String) {
        switch level {
        case .debug: logger.debug("\(message)")
        case .info: logger.info("\(message)")
        case .warning: logger.warning("\(message)")
        case .error: logger.error("\(message)")
        }
    }

    var components: [ComponentInfo] { tables?.components.map(\.info) ?? [] }

    func features(for target: IQTarget) -> [String] {
        switch target {
        case .server, .both: return tables?.serverFeatures ?? []
        case .account: return tables?.accountFeatures ?? []
        }
    }

    func identities(for target: IQTarget) -> [DiscoIdentity] {
        switch target {
        case .server, .both: return tables?.serverIdentities ?? []
        case .account: return tables?.accountIdentities ?? []
        }
    }

    func discoItems(_ request: IQRequest) async -> [XMLElement]? {
        let target: IQTarget = request.to.localpart == nil ? .server : .account
        let node = request.payload[attribute: "node"]
        var items: [XMLElement] = []
        var known = node == nil
        for (provider, providerTarget) in tables?.discoItemProviders ?? [] where providerTarget == .both || providerTarget == target {
            do {
                guard let answer = try await provider(request) else { continue }
                items += answer
                known = true
            } catch {
                logger.error("disco#items provider failed", metadata: ["error": "\(error)"])
            }
        }
        return known ? items : nil
    }
}

/// Creates every enabled module on every host, and replaces one module's instances on reload.
enum ModuleLoader {
    static func load(configuration: StarlingConfiguration, catalog: [String: any ServerModule.Type], logger: Logger,
                     router: Router, services: ServiceDirectory) throws -> [String: HostModules] {
        var result: [String: HostModules] = [:]
        for domain in configuration.hosts {
            var instances: [String: any ServerModule] = [:]
            var registrars: [ModuleRegistrar] = []
            var adapters: [String: ModuleHostAdapter] = [:]
            for module in configuration.modules(for: domain) {
                guard let type = catalog[module.name] else { throw ModuleError("module '\(module.name)' is not available") }
                let (instance, registrar, adapter) = try instantiate(type, module, domain: domain, logger: logger, router: router, services: services)
                instances[module.name] = instance
                registrars.append(registrar)
                adapters[module.name] = adapter
            }
            let tables = try HostModules(domain: domain, modules: instances, registrars: registrars, adapters: adapters,
                                         authMethod: configuration.auth.method(for: domain))
            tables.attachAdapters()
            result[domain] = tables
        }
        return result
    }

    /// New tables for every host that runs `name`, with a new instance of `type` in its place (state
    /// handed over when both versions support it). Nothing is swapped here: the caller installs the
    /// result, so a failure on any host leaves every host as it was.
    static func replacing(_ name: String, with type: any ServerModule.Type, in current: [String: HostModules],
                          configuration: StarlingConfiguration, logger: Logger, router: Router, services: ServiceDirectory) throws -> [String: HostModules] {
        var result: [String: HostModules] = [:]
        for (domain, host) in current {
            guard let old = host.modules[name], var module = configuration.modules(for: domain).first(where: { $0.name == name }) else { continue }
            module.options = try adapt(module.options, to: type.descriptor)
            let (instance, registrar, adapter) = try instantiate(type, module, domain: domain, logger: logger, router: router, services: services)
            if let old = old as? any StateHandoverModule, let new = instance as? any StateHandoverModule {
                new.restoreState(old.saveState())
            }
            var instances = host.modules
            instances[name] = instance
            var adapters = host.adapters
            adapters[name] = adapter
            let registrars = host.registrars.map { $0.module == name ? registrar : $0 }
            result[domain] = try HostModules(domain: domain, modules: instances, registrars: registrars, adapters: adapters,
                                             authMethod: configuration.auth.method(for: domain))
        }
        return result
    }

    /// New tables for every host whose module set or module options differ between `old` and `new`:
    /// unchanged modules keep their instances (and state), changed and added ones are created anew,
    /// removed ones are left out. Nothing is installed here. Returns the tables and what changed.
    static func reconfiguring(_ current: [String: HostModules], from old: StarlingConfiguration, to new: StarlingConfiguration,
                              catalog: [String: any ServerModule.Type], logger: Logger, router: Router,
                              services: ServiceDirectory) throws -> (tables: [String: HostModules], changes: [String]) {
        var result: [String: HostModules] = [:]
        var changes: [String] = []
        for (domain, host) in current.sorted(by: { $0.key < $1.key }) {
            let before = Dictionary(uniqueKeysWithValues: old.modules(for: domain).map { ($0.name, $0) })
            let after = new.modules(for: domain)
            var instances: [String: any ServerModule] = [:]
            var registrars: [ModuleRegistrar] = []
            var adapters: [String: ModuleHostAdapter] = [:]
            var changed = false
            for module in after {
                if before[module.name] == module, let instance = host.modules[module.name], let adapter = host.adapters[module.name],
                   let registrar = host.registrars.first(where: { $0.module == module.name }) {
                    instances[module.name] = instance
                    registrars.append(registrar)
                    adapters[module.name] = adapter
                    continue
                }
                guard let type = catalog[module.name] else { throw ModuleError("module '\(module.name)' is not available") }
                let (instance, registrar, adapter) = try instantiate(type, module, domain: domain, logger: logger, router: router, services: services)
                instances[module.name] = instance
                registrars.append(registrar)
                adapters[module.name] = adapter
                changes.append("\(domain): \(module.name) \(before[module.name] == nil ? "enabled" : "restarted with new options")")
                changed = true
            }
            for name in before.keys.sorted() where !after.contains(where: { $0.name == name }) {
                changes.append("\(domain): \(name) disabled")
                changed = true
            }
            // The auth method itself needs a restart (listeners fix the offered mechanisms); the running one is kept.
            if changed {
                result[domain] = try HostModules(domain: domain, modules: instances, registrars: registrars, adapters: adapters,
                                                 authMethod: old.auth.method(for: domain))
            }
        }
        return (result, changes)
    }

    /// Tells the instances `tables` brought in that they serve now, then those of the hosts `tables`
    /// replaced that are gone that they no longer do (`ActivatableModule`).
    static func activate(_ tables: [String: HostModules], replacing previous: [String: HostModules]) {
        let old = instances(in: previous.filter { tables[$0.key] != nil })
        let new = instances(in: tables)
        for (id, module) in new where old[id] == nil { (module as? any ActivatableModule)?.activated() }
        for (id, module) in old where new[id] == nil { (module as? any ActivatableModule)?.deactivated() }
    }

    private static func instances(in tables: [String: HostModules]) -> [ObjectIdentifier: any ServerModule] {
        var result: [ObjectIdentifier: any ServerModule] = [:]
        for host in tables.values {
            for module in host.modules.values { result[ObjectIdentifier(module)] = module }
        }
        return result
    }

    /// The configured options as the new build declares them: options it added get their defaults, and
    /// one whose type changed refuses the reload (it needs the config changed and a restart).
    private static func adapt(_ options: ModuleOptions, to descriptor: ModuleDescriptor) throws -> ModuleOptions {
        var values: [String: ModuleOptionValue] = [:]
        for spec in descriptor.options {
            guard let value = options.values[spec.key] else {
                values[spec.key] = spec.defaultValue
                continue
            }
            switch (spec.kind, value) {
            case (.integer, .integer), (.number, .number), (.number, .integer), (.boolean, .boolean), (.string, .string), (.stringList, .stringList):
                values[spec.key] = value
            default:
                throw ModuleError("option '\(spec.key)' of '\(descriptor.name)' changed type in the new build: change the config and restart")
            }
        }
        return ModuleOptions(values)
    }

    private static func instantiate(_ type: any ServerModule.Type, _ module: ModuleConfiguration, domain: String, logger: Logger,
                                    router: Router, services: ServiceDirectory) throws -> (any ServerModule, ModuleRegistrar, ModuleHostAdapter) {
        var moduleLogger = logger
        moduleLogger[metadataKey: "module"] = "\(module.name)"
        moduleLogger[metadataKey: "host"] = "\(domain)"
        let adapter = ModuleHostAdapter(domain: domain, options: module.options, logger: moduleLogger, router: router, services: services)
        let instance: any ServerModule
        do { instance = try type.init(host: adapter) } catch {
            throw ModuleError("module '\(module.name)' failed to start on \(domain): \(error)")
        }
        let registrar = ModuleRegistrar(module: module.name)
        instance.register(registrar)
        return (instance, registrar, adapter)
    }
}

/// Services the server offers modules by type (storage protocols, mostly).
public final class ServiceDirectory: @unchecked Sendable {
    private var services: [ObjectIdentifier: Any] = [:]

    public init() {}

    /// Registration happens before any module starts; lookups after that are read-only.
    public func register<Service>(_ service: Service, as type: Service.Type) {
        services[ObjectIdentifier(type)] = service
    }

    func lookup<Service>(_ type: Service.Type) -> Service? {
        services[ObjectIdentifier(type)] as? Service
    }
}
