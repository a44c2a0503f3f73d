import StarlingAPI

/// The namespaces message archiving speaks.
public enum MAMNamespace {
    public static let mam = "urn:xmpp:mam:2"
    public static let extended = "urn:xmpp:mam:2#extended"
    public static let stanzaID = "urn:xmpp:sid:0"
    public static let rsm = "http://jabber.org/protocol/rsm"
    public static let forward = "urn:xmpp:forward:0"
    public static let delay = "urn:xmpp:delay"
    public static let hints = "urn:xmpp:hints"
    public static let fullText = "urn:xmpp:fulltext:0"
    public static let fullTextField = "{urn:xmpp:fulltext:0}fulltext"
    static let mucUser = "http://jabber.org/protocol/muc#user"
}

/// What goes into an account's archive (XEP-0313 §7.1.1, XEP-0334).
public enum Archivable {
    /// End-to-end encrypted payloads that stand in for a body.
    private static let encrypted: [(name: String, namespace: String)] = [
        ("encrypted", "eu.siacs.conversations.axolotl"), ("encrypted", "urn:xmpp:omemo:2"),
        ("openpgp", "urn:xmpp:openpgp:0"), ("x", "jabber:x:encrypted"),
    ]

    /// Chat and normal messages with a body or an encrypted payload, or that ask to be stored; never
    /// errors, headlines, groupchat, chat states or receipts alone, nor what asks not to be stored.
    public static func message(_ stanza: XMLElement) -> Bool {
        guard stanza.name == "message" else { return false }
        let type = stanza[attribute: "type"] ?? "normal"
        guard type == "chat" || type == "normal" else { return false }
        var content = false
        for child in stanza.elements {
            switch (child.namespace, child.name) {
            case (MAMNamespace.hints, "no-store"), (MAMNamespace.hints, "no-permanent-store"):
                return false
            case (Namespace.client, "body"), (MAMNamespace.hints, "store"):
                content = true
            default:
                if encrypted.contains(where: { $0.name == child.name && $0.namespace == child.namespace }) { content = true }
            }
        }
        return content
    }

    /// XEP-0359 §4: a stanza-id claiming to be from `archive` that the archive did not add is removed.
    /// Returns whether there was one.
    public static func stripStanzaIDs(by archive: JID, from stanza: inout XMLElement) -> Bool {
        let by = archive.description
        let before = stanza.children.count
        stanza.children.removeAll { node in
            guard case .element(let element) = node else { return false }
            return element.name == "stanza-id" && element.namespace == MAMNamespace.stanzaID && element[attribute: "by"] == by
        }
        return stanza.children.count != before
    }

    public static func stanzaID(_ id: String, by archive: JID) -> XMLElement {
        XMLElement(name: "stanza-id", namespace: MAMNamespace.stanzaID, attributes: ["id": id, "by": archive.description])
    }
}
