import StarlingAPI
import StarlingStorage

/// What a privacy rule can be about (XEP-0016 §2.1).
enum PrivacyStanzaKind: String, Sendable {
    case message
    case iq
    case presenceIn = "presence-in"
    case presenceOut = "presence-out"
    /// Anything else (subscription requests, IQ results): only rules that name no kind cover it.
    case other

    /// The kind of an inbound stanza.
    static func inbound(_ stanza: XMLElement) -> PrivacyStanzaKind {
        let type = stanza[attribute: "type"]
        switch stanza.name {
        case "message": return .message
        case "iq": return type == "get" || type == "set" ? .iq : .other
        case "presence": return type == nil || type == "unavailable" ? .presenceIn : .other
        default: return .other
        }
    }
}

/// One XEP-0016 list, its rules in order, and the decision it makes about a contact.
struct PrivacyList: Sendable, Equatable {
    let rules: [PrivacyRule]

    init(_ rules: [PrivacyRule]) {
        self.rules = rules.sorted { $0.order < $1.order }
    }

    /// Whether the first rule that matches denies; nil when none matches (the stanza passes).
    /// `rosterItem` is the contact's entry in the account's roster, if any.
    func denies(_ kind: PrivacyStanzaKind, contact: JID, rosterItem: RosterItem?) -> Bool? {
        for rule in rules where Self.covers(rule, kind) && Self.matches(rule, contact: contact, rosterItem: rosterItem) {
            return rule.action == "deny"
        }
        return nil
    }

    /// Whether the list says anything about group or subscription (so the roster must be at hand).
    var needsRoster: Bool { rules.contains { $0.type == "group" || $0.type == "subscription" } }

    private static func covers(_ rule: PrivacyRule, _ kind: PrivacyStanzaKind) -> Bool {
        rule.stanzas.isEmpty || rule.stanzas.contains(kind.rawValue)
    }

    /// XEP-0016 §2.1's JID matching: full JID, bare JID, domain/resource, or domain (with any user or resource).
    private static func matches(_ rule: PrivacyRule, contact: JID, rosterItem: RosterItem?) -> Bool {
        switch rule.type {
        case nil:
            return true
        case "jid":
            guard let value = rule.value.flatMap({ JID($0) }) else { return false }
            if value.localpart != nil {
                return value.resourcepart == nil ? value == contact.bare : value == contact
            }
            if let resource = value.resourcepart { return contact.localpart == nil && contact.domainpart == value.domainpart && contact.resourcepart == resource }
            return contact.domainpart == value.domainpart
        case "group":
            return rule.value.map { rosterItem?.groups.contains($0) ?? false } ?? false
        case "subscription":
            return (rosterItem?.subscription ?? .none).rawValue == rule.value
        default:
            return false
        }
    }

    /// Checks a list a client sent (XEP-0016 §2.3's validity), returning the rules or why they are refused.
    static func parse(_ list: XMLElement, namespace: String, maxRules: Int) -> Result<[PrivacyRule], PrivacyListProblem> {
        var rules: [PrivacyRule] = []
        var orders = Set<Int>()
        for item in list.elements where item.name == "item" {
            guard let action = item[attribute: "action"], action == "allow" || action == "deny" else { return .failure(PrivacyListProblem("each item needs action allow or deny")) }
            guard let order = item[attribute: "order"].flatMap({ Int($0) }), order >= 0, orders.insert(order).inserted else {
                return .failure(PrivacyListProblem("each item needs an order of its own (a non-negative integer)"))
            }
            let type = item[attribute: "type"]
            let value = item[attribute: "value"]
            switch type {
            case nil: break
            case "jid": guard value.flatMap({ JID($0) }) != nil else { return .failure(PrivacyListProblem("a jid item needs a valid JID as its value")) }
            case "group": guard let value, !value.isEmpty else { return .failure(PrivacyListProblem("a group item needs the group's name")) }
            case "subscription": guard let value, ["none", "to", "from", "both"].contains(value) else { return .failure(PrivacyListProblem("subscription is none, to, from or both")) }
            default: return .failure(PrivacyListProblem("unknown item type \(type!)"))
            }
            let kinds = item.elements.map(\.name)
            guard kinds.allSatisfy({ ["message", "iq", "presence-in", "presence-out"].contains($0) }) else { return .failure(PrivacyListProblem("unknown stanza kind in an item")) }
            rules.append(PrivacyRule(type: type, value: type == "jid" ? value.flatMap { JID($0)?.description } : value, action: action, order: order, stanzas: kinds))
        }
        guard rules.count <= maxRules else { return .failure(PrivacyListProblem("a list holds at most \(maxRules) items")) }
        return .success(rules)
    }

    /// The `<list/>` element of a stored list.
    static func element(name: String, rules: [PrivacyRule], namespace: String) -> XMLElement {
        var list = XMLElement(name: "list", namespace: namespace, attributes: ["name": name])
        for rule in rules.sorted(by: { $0.order < $1.order }) {
            var attributes = ["action": rule.action, "order": String(rule.order)]
            attributes["type"] = rule.type
            attributes["value"] = rule.value
            var item = XMLElement(name: "item", namespace: namespace, attributes: attributes)
            for kind in rule.stanzas { item.append(XMLElement(name: kind, namespace: namespace)) }
            list.append(item)
        }
        return list
    }
}

/// Why a list a client sent was refused.
struct PrivacyListProblem: Error {
    let text: String
    init(_ text: String) { self.text = text }
}
