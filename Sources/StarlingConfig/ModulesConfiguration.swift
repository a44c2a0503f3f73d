import StarlingAPI
import Yams

/// One enabled module with its validated options.
public struct ModuleConfiguration: Sendable, Equatable {
    public var name: String
    public var options: ModuleOptions
}

extension StarlingConfiguration {
    /// Reads `modules:` (every host) and `host_modules:` (a host's own set, replacing `modules:` there):
    /// mappings from module name to its options (`{}` for defaults). Unknown modules, missing
    /// dependencies, unknown hosts and bad options fail here, with file and line.
    /// `leavingOut`: plugin modules that could not be loaded; they are skipped, not errors.
    static func readModules(_ top: ConfigSection, hosts: [String], catalog: [ModuleDescriptor], leavingOut: Set<String> = [], accessRules: Set<String> = AccessControl.builtinRules) throws(ConfigError) -> (all: [ModuleConfiguration], perHost: [String: [ModuleConfiguration]]) {
        let section = try top.section("modules", doc: "Modules enabled on every host, each with its options. Default: \(defaultModules.joined(separator: ", ")).")
        let all = try readModuleSet(section, catalog: catalog, defaults: defaultModules, leavingOut: leavingOut, accessRules: accessRules)
        let hostSection = try top.section("host_modules", doc: "Per host, a module set that replaces `modules` on that host (same format).")
        var perHost: [String: [ModuleConfiguration]] = [:]
        for (key, _) in hostSection.node?.mapping ?? [:] {
            let host = key.string ?? ""
            guard let domain = JID(host)?.domainpart, hosts.contains(domain) else {
                throw hostSection.error(host, "not one of the configured hosts (\(hosts.joined(separator: ", ")))", at: key)
            }
            perHost[domain] = try readModuleSet(try hostSection.section(host, doc: "modules of \(host)"), catalog: catalog, defaults: [], leavingOut: leavingOut, accessRules: accessRules)
        }
        try hostSection.rejectUnknownKeys()
        return (all, perHost)
    }

    private static func readModuleSet(_ section: ConfigSection, catalog: [ModuleDescriptor], defaults: [String], leavingOut: Set<String>, accessRules: Set<String>) throws(ConfigError) -> [ModuleConfiguration] {
        let byName = Dictionary(uniqueKeysWithValues: catalog.map { ($0.name, $0) })
        var names: [String] = []
        if section.node == nil {
            names = defaults.filter { byName[$0] != nil }
        } else {
            for (key, _) in section.node?.mapping ?? [:] { names.append(key.string ?? "") }
        }
        var result: [ModuleConfiguration] = []
        for name in names where !leavingOut.contains(name) {
            guard let descriptor = byName[name] else {
                throw section.error(name, "unknown module (available: \(byName.keys.sorted().joined(separator: ", ")))", at: section.keyNode(name))
            }
            let options = try section.section(name, doc: descriptor.summary)
            var values: [String: ModuleOptionValue] = [:]
            for spec in descriptor.options {
                values[spec.key] = try options.readModuleOption(spec, accessRules: accessRules)
            }
            try options.rejectUnknownKeys()
            result.append(ModuleConfiguration(name: name, options: ModuleOptions(values)))
        }
        let enabled = Set(result.map(\.name))
        for module in result {
            for dependency in byName[module.name]!.dependencies where !enabled.contains(dependency) && !leavingOut.contains(dependency) {
                throw section.error(module.name, "needs module '\(dependency)', which is not enabled", at: section.keyNode(module.name))
            }
        }
        return result
    }

    public static let defaultModules = [
        "disco", "ping", "version", "time", "roster", "presence", "offline", "blocking", "privacy", "private", "vcard", "last", "carbons", "csi", "stream_management", "push", "register",
        "muc", "mam", "pep", "pubsub",
    ]
}

extension ConfigSection {
    func keyNode(_ key: String) -> Node? {
        node?.mapping?.first { $0.key.string == key }?.key
    }

    func valueNode(_ key: String) -> Node? {
        node?.mapping?.first { $0.key.string == key }?.value
    }

    func readModuleOption(_ spec: ModuleOptionSpec, accessRules: Set<String>) throws(ConfigError) -> ModuleOptionValue {
        switch spec.kind {
        case .integer(let range):
            guard case .integer(let fallback) = spec.defaultValue else { preconditionFailure("default of \(spec.key) is not an integer") }
            return .integer(try read(ConfigOption<Int>(spec.key, default: fallback, range: range, doc: spec.doc)))
        case .number(let range):
            guard case .number(let fallback) = spec.defaultValue else { preconditionFailure("default of \(spec.key) is not a number") }
            return .number(try read(ConfigOption<Double>(spec.key, default: fallback, range: range, doc: spec.doc)))
        case .boolean:
            guard case .boolean(let fallback) = spec.defaultValue else { preconditionFailure("default of \(spec.key) is not a boolean") }
            return .boolean(try read(ConfigOption<Bool>(spec.key, default: fallback, doc: spec.doc)))
        case .string(let choices):
            guard case .string(let fallback) = spec.defaultValue else { preconditionFailure("default of \(spec.key) is not a string") }
            if let choices { return .string(try read(ConfigOption<String>(spec.key, default: fallback, oneOf: choices, doc: spec.doc))) }
            return .string(try read(ConfigOption<String>(spec.key, default: fallback, doc: spec.doc)))
        case .stringList:
            guard case .stringList(let fallback) = spec.defaultValue else { preconditionFailure("default of \(spec.key) is not a list") }
            return .stringList(try read(ConfigOption<[String]>(spec.key, default: fallback, doc: spec.doc)))
        case .accessRule:
            guard case .string(let fallback) = spec.defaultValue else { preconditionFailure("default of \(spec.key) is not a rule name") }
            return .string(try read(ConfigOption<String>(spec.key, default: fallback, doc: spec.doc + " (an access rule)") { name in
                accessRules.contains(name) ? nil : "no access rule '\(name)' (rules: \(accessRules.sorted().joined(separator: ", ")))"
            }))
        }
    }
}
