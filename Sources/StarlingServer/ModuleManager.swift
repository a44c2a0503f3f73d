import Logging
import StarlingAPI
import StarlingConfig

/// The modules enabled on one host and the dispatch tables built from their registrations. Built
/// once at start and immutable afterwards, so the stanza path reads it without any lock.
final class HostModules: Sendable {
    struct IQEntry: Sendable {
        let module: String
        let target: IQTarget
        let handler: IQHandler
    }

    let domain: String
    let modules: [String: any ServerModule]
    let serverFeatures: [String]
    let accountFeatures: [String]
    let preAuthStreamFeatures: [XMLElement]
    let boundStreamFeatures: [XMLElement]
    let iqHandlers: [ModuleRegistrar.IQKey: IQEntry]
    /// Per hook name, handlers in the order they run (priority descending, then registration order).
    let hooks: [String: [ModuleRegistrar.HookRegistration]]

    init(domain: String, modules: [String: any ServerModule], registrars: [ModuleRegistrar]) throws {
        self.domain = domain
        self.modules = modules
        var server = Set<String>(), account = Set<String>()
        var iqHandlers: [ModuleRegistrar.IQKey: IQEntry] = [:]
        var hooks: [String: [ModuleRegistrar.HookRegistration]] = [:]
        var preAuth: [XMLElement] = [], bound: [XMLElement] = []
        for registrar in registrars {
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
            for registration in registrar.iqHandlers {
                if let existing = iqHandlers[registration.key] {
                    throw ModuleError("modules '\(existing.module)' and '\(registrar.module)' both handle <\(registration.key.name) xmlns='\(registration.key.namespace)'/> \(registration.key.type.rawValue)")
                }
                iqHandlers[registration.key] = IQEntry(module: registrar.module, target: registration.target, handler: registration.handler)
            }
            for hook in registrar.hooks { hooks[hook.name, default: []].append(hook) }
        }
        // Stable sort keeps registration order among equal priorities.
        self.hooks = hooks.mapValues { list in
            list.enumerated().sorted { ($0.element.priority, -$0.offset) > ($1.element.priority, -$1.offset) }.map(\.element)
        }
        self.preAuthStreamFeatures = preAuth
        self.boundStreamFeatures = bound
        self.serverFeatures = server.sorted()
        self.accountFeatures = account.sorted()
        self.iqHandlers = iqHandlers
    }

    /// Runs the handlers of `point` until one ends propagation. A `.modify` replaces the stanza of a
    /// `StanzaEvent` for the handlers after it and is what the caller gets if nobody ends propagation.
    func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult {
        guard let handlers = hooks[point.name] else { return .pass }
        var event = event
        var modified: XMLElement?
        for handler in handlers {
            switch handler.handler(event) {
            case .pass:
                continue
            case .modify(let stanza):
                guard var stanzaEvent = event as? StanzaEvent else { continue }
                stanzaEvent.stanza = stanza
                event = stanzaEvent as! Event
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
    /// Set once the host's tables exist (modules are created before their registrations are known).
    var tables: HostModules?

    init(domain: String, options: ModuleOptions, logger: Logger, router: Router, services: ServiceDirectory) {
        self.domain = domain
        self.options = options
        self.logger = logger
        self.router = router
        self.services = services
    }

    func route(_ stanza: XMLElement) { router.routeFromServer(stanza) }

    func resources(of bare: JID) -> [ResourceInfo] {
        router.registry.resources(of: bare).map { ResourceInfo(jid: $0.session.jid, available: $0.available, priority: $0.priority) }
    }

    func setAvailability(of full: JID, available: Bool, priority: Int) {
        guard case .local(let session)? = router.registry.location(of: full) else { return }
        router.registry.setPresence(of: session, available: available, priority: priority)
    }

    func isLocal(_ domain: String) -> Bool { router.hosts.contains(domain) }

    func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult {
        router.run(point, event, on: domain)
    }

    func closeSessions(of bare: JID) {
        for resource in router.registry.resources(of: bare.bare) { resource.session.close(.notAuthorized) }
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

    func features(for target: IQTarget) -> [String] {
        switch target {
        case .server, .both: return tables?.serverFeatures ?? []
        case .account: return tables?.accountFeatures ?? []
        }
    }
}

/// Creates every enabled module on every host.
enum ModuleLoader {
    static func load(configuration: StarlingConfiguration, catalog: [String: any ServerModule.Type], logger: Logger,
                     router: Router, services: ServiceDirectory) throws -> [String: HostModules] {
        var result: [String: HostModules] = [:]
        for domain in configuration.hosts {
            var instances: [String: any ServerModule] = [:]
            var registrars: [ModuleRegistrar] = []
            var adapters: [ModuleHostAdapter] = []
            for module in configuration.modules(for: domain) {
                guard let type = catalog[module.name] else { throw ModuleError("module '\(module.name)' is not available") }
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
                instances[module.name] = instance
                registrars.append(registrar)
                adapters.append(adapter)
            }
            let tables = try HostModules(domain: domain, modules: instances, registrars: registrars)
            for adapter in adapters { adapter.tables = tables }
            result[domain] = tables
        }
        return result
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
