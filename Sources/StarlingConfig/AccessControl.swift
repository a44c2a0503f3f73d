import Foundation
import StarlingAPI
import Yams

/// Who or what an access rule is asked about: an account (when known) and a client address (when known).
public struct AccessSubject: Sendable {
    public var user: JID?
    public var address: String?

    public init(user: JID?, address: String?) {
        self.user = user
        self.address = address
    }
}

/// ejabberd-style access control (`acl:` and `access_rules:`): named lists of users, servers, JID patterns,
/// networks and Lua predicates, and named rules whose entries (`allow: list` or `deny: list`) are tried
/// in order, the first whose list matches deciding; no match denies.
public struct AccessControl: Sendable, Equatable {
    /// Lists every configuration has: `all`, `none`, and `local` (accounts of this server's hosts).
    public static let builtinLists: Set<String> = ["all", "none", "local"]
    /// Rules every configuration has: `all` allows everyone, `none` no one.
    public static let builtinRules: Set<String> = ["all", "none"]

    public var lists: [String: AccessList] = [:]
    public var rules: [String: [AccessRuleEntry]] = [:]

    public init(lists: [String: AccessList] = [:], rules: [String: [AccessRuleEntry]] = [:]) {
        self.lists = lists
        self.rules = rules
    }

    /// Every rule name a module option or the core may name.
    public var ruleNames: Set<String> { Self.builtinRules.union(rules.keys) }

    /// Whether `rule` allows `subject`. `isLocal` says whether a domain is one of this server's hosts;
    /// `predicate` asks the modules (Lua scripts) whether the subject is in a `lua` list. An unknown rule denies
    /// (configuration loading refuses names that do not exist, so this only guards against a race with a reload).
    public func allows(_ rule: String, _ subject: AccessSubject, isLocal: (String) -> Bool,
                       predicate: (String, AccessSubject) -> Bool) -> Bool {
        switch rule {
        case "all": return true
        case "none": return false
        default: break
        }
        for entry in rules[rule] ?? [] where matches(entry.list, subject, isLocal: isLocal, predicate: predicate) {
            return entry.allow
        }
        return false
    }

    func matches(_ list: String, _ subject: AccessSubject, isLocal: (String) -> Bool, predicate: (String, AccessSubject) -> Bool) -> Bool {
        switch list {
        case "all": return true
        case "none": return false
        case "local": return subject.user.map { isLocal($0.domainpart) } ?? false
        default: return lists[list]?.matches(subject, predicate: predicate) ?? false
        }
    }
}

/// One `allow: list` or `deny: list` entry of a rule.
public struct AccessRuleEntry: Sendable, Equatable {
    public var allow: Bool
    public var list: String

    public init(allow: Bool, list: String) {
        self.allow = allow
        self.list = list
    }
}

/// A named ACL list: a subject is in it when any of its criteria matches.
public struct AccessList: Sendable, Equatable {
    /// Bare JIDs, lowercased.
    public var users: Set<String> = []
    /// Domains (a user of one is in the list).
    public var servers: Set<String> = []
    /// Regular expressions a bare JID must match whole.
    public var patterns: [JIDPattern] = []
    public var networks: [IPNetwork] = []
    /// Names of Lua predicates (`starling.hook('access', ...)` handlers see `list` and the subject).
    public var lua: [String] = []

    public init() {}

    func matches(_ subject: AccessSubject, predicate: (String, AccessSubject) -> Bool) -> Bool {
        if let user = subject.user {
            let bare = user.bare.description.lowercased()
            if users.contains(bare) || servers.contains(user.domainpart.lowercased()) { return true }
            if patterns.contains(where: { $0.matches(bare) }) { return true }
        }
        if let address = subject.address, let parsed = IPNetwork.bytes(of: address), networks.contains(where: { $0.contains(parsed) }) { return true }
        return lua.contains { predicate($0, subject) }
    }
}

/// A compiled regular expression over bare JIDs; equal when their sources are.
public final class JIDPattern: @unchecked Sendable, Equatable {
    public let source: String
    // NSRegularExpression is immutable and safe to share between threads once made.
    private let expression: NSRegularExpression

    public init?(_ source: String) {
        guard let expression = try? NSRegularExpression(pattern: "^(?:\(source))$", options: [.caseInsensitive]) else { return nil }
        self.source = source
        self.expression = expression
    }

    func matches(_ text: String) -> Bool {
        expression.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)) != nil
    }

    public static func == (lhs: JIDPattern, rhs: JIDPattern) -> Bool { lhs.source == rhs.source }
}

/// An IPv4 or IPv6 network in CIDR notation (`10.0.0.0/8`, `::1/128`; a bare address is a /32 or /128).
/// IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`) count as their IPv4 address.
public struct IPNetwork: Sendable, Equatable {
    public let bytes: [UInt8]
    public let prefix: Int

    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1).map(String.init)
        guard let bytes = Self.bytes(of: parts[0]) else { return nil }
        let prefix = parts.count == 2 ? Int(parts[1]) : bytes.count * 8
        guard let prefix, (0...(bytes.count * 8)).contains(prefix) else { return nil }
        self.bytes = bytes
        self.prefix = prefix
    }

    func contains(_ address: [UInt8]) -> Bool {
        guard address.count == bytes.count else { return false }
        var remaining = prefix
        for (a, b) in zip(address, bytes) where remaining > 0 {
            let bits = min(8, remaining)
            let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
            if a & mask != b & mask { return false }
            remaining -= bits
        }
        return true
    }

    /// The address's bytes (4 for IPv4, 16 for IPv6; a mapped IPv4 address gives 4), or nil if it is not one.
    static func bytes(of text: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, text, &v6) == 1 else { return nil }
        let bytes = withUnsafeBytes(of: &v6) { Array($0) }
        if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xFF && bytes[11] == 0xFF { return Array(bytes[12...]) }
        return bytes
    }
}

extension StarlingConfiguration {
    static let aclUsers = ConfigOption<[String]>("users", default: [], doc: "Bare JIDs in the list.")
    static let aclServers = ConfigOption<[String]>("servers", default: [], doc: "Domains whose users are in the list.")
    static let aclRegexp = ConfigOption<[String]>("regexp", default: [], doc: "Regular expressions a bare JID must match whole (case-insensitive).")
    static let aclNetworks = ConfigOption<[String]>("networks", default: [], doc: "Client addresses in CIDR notation (10.0.0.0/8, ::1/128).")
    static let aclLua = ConfigOption<[String]>("lua", default: [], doc: "Lua predicates: the lua module's `access` handlers are asked, with event.list set to the name; \"allow\" means in the list.")

    /// Reads `acl:` and `access_rules:`. Unknown list kinds, bad networks or expressions, rules naming
    /// lists that do not exist and entries other than `allow:`/`deny:` fail with file and line.
    static func readAccessControl(_ top: ConfigSection) throws(ConfigError) -> AccessControl {
        var control = AccessControl()
        let aclSection = try top.section("acl", doc: "Named lists of users, servers, JID patterns, networks and Lua predicates, for access_rules (built in: all, none, local).")
        for (key, _) in aclSection.node?.mapping ?? [:] {
            let name = key.string ?? ""
            if AccessControl.builtinLists.contains(name) { throw aclSection.error(name, "'\(name)' is built in and cannot be redefined", at: key) }
            let section = try aclSection.section(name, doc: "the list \(name)")
            var list = AccessList()
            for user in try section.read(aclUsers) {
                guard let jid = JID(user), jid.localpart != nil, jid.resourcepart == nil else {
                    throw section.error("users", "'\(user)' is not a bare JID", at: section.valueNode("users"))
                }
                list.users.insert(jid.description.lowercased())
            }
            for server in try section.read(aclServers) {
                guard let jid = JID(server), jid.localpart == nil, jid.resourcepart == nil else {
                    throw section.error("servers", "'\(server)' is not a domain", at: section.valueNode("servers"))
                }
                list.servers.insert(jid.domainpart.lowercased())
            }
            for source in try section.read(aclRegexp) {
                guard let pattern = JIDPattern(source) else { throw section.error("regexp", "'\(source)' is not a valid regular expression", at: section.valueNode("regexp")) }
                list.patterns.append(pattern)
            }
            for text in try section.read(aclNetworks) {
                guard let network = IPNetwork(text) else { throw section.error("networks", "'\(text)' is not an address or CIDR network", at: section.valueNode("networks")) }
                list.networks.append(network)
            }
            list.lua = try section.read(aclLua)
            try section.rejectUnknownKeys()
            control.lists[name] = list
        }
        try aclSection.rejectUnknownKeys()

        let rulesSection = try top.section("access_rules", doc: "Named rules: lists of `allow: LIST` or `deny: LIST`, the first matching entry deciding, no match denying (built in: all, none). Modules and auth name them.")
        let known = AccessControl.builtinLists.union(control.lists.keys)
        for (key, value) in rulesSection.node?.mapping ?? [:] {
            let name = key.string ?? ""
            if AccessControl.builtinRules.contains(name) { throw rulesSection.error(name, "'\(name)' is built in and cannot be redefined", at: key) }
            guard let entries = value.sequence else { throw rulesSection.error(name, "expected a list of `- allow: LIST` or `- deny: LIST`", at: value) }
            var rule: [AccessRuleEntry] = []
            for entry in entries {
                guard let mapping = entry.mapping, mapping.count == 1, let (verdict, list) = mapping.first.map({ ($0.key.string ?? "", $0.value.string ?? "") }),
                      verdict == "allow" || verdict == "deny" else {
                    throw rulesSection.error(name, "each entry is `allow: LIST` or `deny: LIST`", at: entry)
                }
                guard known.contains(list) else {
                    throw rulesSection.error(name, "no list '\(list)' in acl (lists: \(known.sorted().joined(separator: ", ")))", at: entry)
                }
                rule.append(AccessRuleEntry(allow: verdict == "allow", list: list))
            }
            rulesSection.claim(name)
            control.rules[name] = rule
        }
        try rulesSection.rejectUnknownKeys()
        return control
    }
}
