import Logging
import NIOConcurrencyHelpers
import StarlingAPI
import StarlingConfig
import StarlingModules

/// Changes to the running server without a restart: a plugin module's new build (`reload-module`) and
/// a changed configuration (`reload-config`). Each builds everything new first and swaps the module
/// tables once, so a change is applied whole or not at all; one reload runs at a time.
final class LiveReloads: @unchecked Sendable {
    /// The configuration the running modules were built from (its other sections stay as at start).
    private let running: NIOLockedValueBox<StarlingConfiguration>
    private let oneAtATime = NIOLock()
    private let pluginModules: [String: any ServerModule.Type]
    private let logger: Logger
    private let router: Router
    private let services: ServiceDirectory

    init(configuration: StarlingConfiguration, pluginModules: [String: any ServerModule.Type], logger: Logger, router: Router, services: ServiceDirectory) {
        running = NIOLockedValueBox(configuration)
        self.pluginModules = pluginModules
        self.logger = logger
        self.router = router
        self.services = services
    }

    private var catalog: [String: any ServerModule.Type] { BuiltinModules.catalog.merging(pluginModules) { $1 } }

    private func install(_ tables: [String: HostModules]) throws {
        let before = router.modules
        try router.replace(tables)
        for host in tables.values { host.attachAdapters() }
        ModuleLoader.activate(tables, replacing: before)
    }

    func reloadModule(_ name: String) throws -> String {
        try oneAtATime.withLock {
            let configuration = running.withLockedValue { $0 }
            guard let path = configuration.plugins[name] else {
                throw ModuleError(BuiltinModules.catalog[name] != nil ? "'\(name)' is built in: only plugin modules can be reloaded"
                                                                   : "no plugin module '\(name)' in the configuration")
            }
            guard pluginModules[name] != nil else { throw ModuleError("plugin '\(name)' did not load at start: restart to load it") }
            let type = try PluginLoader.load(path: path)
            guard type.descriptor.name == name else { throw ModuleError("\(path) now provides module '\(type.descriptor.name)', not '\(name)'") }
            let replaced = try ModuleLoader.replacing(name, with: type, in: router.modules, configuration: configuration,
                                                      logger: logger, router: router, services: services)
            guard !replaced.isEmpty else { throw ModuleError("module '\(name)' is not enabled on any host") }
            try install(replaced)
            let hosts = replaced.keys.sorted().joined(separator: ", ")
            logger.notice("module reloaded", metadata: ["module": "\(name)", "hosts": "\(hosts)", "plugin_images": "\(PluginLoader.loadedImages)"])
            return "\(name) reloaded on \(hosts); \(PluginLoader.loadedImages) plugin images mapped (never unloaded)"
        }
    }

    /// Reads the config file again. Module changes (enabled, disabled, new options) are applied live
    /// unless `dryRun`; everything else that changed is listed as needing a restart. A config that does
    /// not validate changes nothing and the error names file and line.
    func reloadConfig(dryRun: Bool) throws -> [String] {
        try oneAtATime.withLock {
            let current = running.withLockedValue { $0 }
            let loaded = pluginModules
            let next: StarlingConfiguration
            do {
                next = try StarlingConfiguration.load(path: current.sourcePath, moduleCatalog: BuiltinModules.descriptors) { name, _ in
                    // Loading a new library is a restart's job; plugins loaded at start keep their descriptor.
                    guard let type = loaded[name] else { throw ModuleError("plugin '\(name)' was not loaded at start: restart to load it") }
                    return type.descriptor
                }
            } catch {
                throw ModuleError("\(error)")
            }
            var restart: [String] = []
            func compare<Value: Equatable>(_ name: String, _ path: KeyPath<StarlingConfiguration, Value>) {
                if current[keyPath: path] != next[keyPath: path] { restart.append(name) }
            }
            compare("hosts", \.hosts)
            compare("data_dir", \.dataDirectory)
            compare("log_level", \.logLevel)
            compare("listeners", \.listeners)
            compare("tls", \.tls)
            // The access rules (auth.access and auth.mechanism_access among them) apply live, below.
            var currentAuth = current.auth, nextAuth = next.auth
            (currentAuth.access, currentAuth.mechanismAccess, nextAuth.access, nextAuth.mechanismAccess) = ("", [:], "", [:])
            if currentAuth != nextAuth { restart.append("auth") }
            compare("limits", \.limits)
            compare("storage", \.storage)
            compare("admin", \.admin)
            compare("plugins", \.plugins)
            let accessChanged = current.access != next.access || current.auth.access != next.auth.access
                || current.auth.mechanismAccess != next.auth.mechanismAccess
            var (tables, changes) = try ModuleLoader.reconfiguring(router.modules, from: current, to: next, catalog: catalog,
                                                                    logger: logger, router: router, services: services)
            if accessChanged { changes.append("access rules (acl, access_rules, auth.access, auth.mechanism_access)") }
            if !dryRun {
                try install(tables)
                if accessChanged { router.access.withLockedValue { $0 = AccessPolicy(next) } }
                running.withLockedValue { configuration in
                    configuration.modules = next.modules
                    configuration.hostModules = next.hostModules
                    configuration.access = next.access
                    configuration.auth.access = next.auth.access
                    configuration.auth.mechanismAccess = next.auth.mechanismAccess
                }
                logger.notice("configuration reloaded", metadata: ["applied": "\(changes.joined(separator: "; "))", "needs_restart": "\(restart.joined(separator: ", "))"])
            }
            var report = changes.map { (dryRun ? "would apply: " : "applied: ") + $0 }
            if changes.isEmpty { report.append("no module changes") }
            report += restart.map { "needs a restart: \($0) changed (not applied)" }
            return report
        }
    }
}
