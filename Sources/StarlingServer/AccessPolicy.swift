import NIOConcurrencyHelpers
import StarlingAPI
import StarlingConfig

/// The access rules in effect (`acl:`, `access_rules:`, `auth.access`, `auth.mechanism_access`), replaced
/// as a whole by `reload-config`. Asked at logins, registrations and room creations, not per stanza.
struct AccessPolicy: Sendable {
    var control: AccessControl
    /// The rule deciding who may log in.
    var login: String
    /// Per SASL mechanism, the rule deciding which client addresses it is offered to.
    var mechanisms: [String: String]

    init(_ configuration: StarlingConfiguration) {
        control = configuration.access
        login = configuration.auth.access
        mechanisms = configuration.auth.mechanismAccess
    }
}

extension Router {
    /// Whether `rule` allows `subject`; `lua` lists ask `host`'s modules (the `access-predicate` hook).
    func allows(_ rule: String, _ subject: AccessSubject, on host: String) -> Bool {
        access.withLockedValue { $0 }.control.allows(rule, subject, isLocal: { hosts.contains($0) }) { name, subject in
            if case .handled = run(.accessPredicate, AccessPredicateEvent(predicate: name, user: subject.user, address: subject.address), on: host) {
                return true
            }
            return false
        }
    }

    /// The mechanisms a client at `address` is not offered, by `auth.mechanism_access`.
    func refusedMechanisms(for address: String, on host: String) -> Set<String> {
        let rules = access.withLockedValue { $0 }.mechanisms
        return Set(rules.filter { !allows($0.value, AccessSubject(user: nil, address: address), on: host) }.keys)
    }

    /// Whether `auth.access` lets this account log in from `address`.
    func allowsLogin(_ user: JID, from address: String) -> Bool {
        allows(access.withLockedValue { $0 }.login, AccessSubject(user: user, address: address), on: user.domainpart)
    }
}
