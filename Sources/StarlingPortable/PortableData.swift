import Foundation
import StarlingAPI
import StarlingModules
import StarlingSASL
import StarlingStorage
import StarlingXML

/// XEP-0227 export: every account with its SCRAM keys (never a password), roster, pending subscription
/// requests, offline messages, vCard, private XML, blocklist and message archive. `PortableImport` reads it back.
public enum PortableData {
    public static let namespace = "urn:xmpp:pie:0"
    public static let scramNamespace = "urn:xmpp:pie:0#scram"
    public static let archiveNamespace = "urn:xmpp:pie:0#mam"
    private static let mam = "urn:xmpp:mam:2"
    private static let forward = "urn:xmpp:forward:0"

    /// The whole `<server-data/>` document for `hosts`.
    public static func export(from store: any StarlingStore, hosts: [String]) async throws -> String {
        var out = "<?xml version='1.0' encoding='UTF-8'?>\n<server-data xmlns='\(namespace)'>\n"
        for host in hosts {
            out += "<host jid='\(host)'>\n"
            for username in try await store.accounts(host: host) {
                out += try await exportUser(username, host: host, store: store).serialized(inheritedNamespace: namespace) + "\n"
            }
            out += "</host>\n"
        }
        out += "</server-data>\n"
        return out
    }

    private static func exportUser(_ username: String, host: String, store: any StarlingStore) async throws -> XMLElement {
        let user = try JID(localpart: username, domainpart: host)
        var element = XMLElement(name: "user", namespace: namespace, attributes: ["name": username])
        for credential in try await store.credentials(username: username, host: host) ?? [] {
            var scram = XMLElement(name: "scram-credentials", namespace: scramNamespace, attributes: ["mechanism": credential.hash.mechanism(plus: false)])
            scram.append(XMLElement(name: "iter-count", namespace: scramNamespace).with(text: String(credential.iterations)))
            scram.append(XMLElement(name: "salt", namespace: scramNamespace).with(text: Data(credential.salt).base64EncodedString()))
            scram.append(XMLElement(name: "server-key", namespace: scramNamespace).with(text: Data(credential.serverKey).base64EncodedString()))
            scram.append(XMLElement(name: "stored-key", namespace: scramNamespace).with(text: Data(credential.storedKey).base64EncodedString()))
            element.append(scram)
        }
        let roster = try await store.roster(of: user)
        if !roster.items.isEmpty {
            var query = XMLElement(name: "query", namespace: "jabber:iq:roster")
            for item in roster.items {
                var entry = XMLElement(name: "item", namespace: "jabber:iq:roster", attributes: ["jid": item.jid.description, "subscription": item.subscription.rawValue])
                if let name = item.name { entry[attribute: "name"] = name }
                if item.askSubscribe { entry[attribute: "ask"] = "subscribe" }
                if item.preApproved { entry[attribute: "approved"] = "true" }
                for group in item.groups { entry.append(XMLElement(name: "group", namespace: "jabber:iq:roster").with(text: group)) }
                query.append(entry)
            }
            element.append(query)
        }
        for pending in try await store.pendingSubscriptions(to: user) {
            element.append(XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                "type": "subscribe", "from": pending.contact.description, "to": user.description,
            ]))
        }
        let offline = try await store.offlineMessages(for: user).compactMap { XMLFragmentParser.parse($0) }
        if !offline.isEmpty {
            var messages = XMLElement(name: "offline-messages", namespace: namespace)
            for message in offline { messages.append(message) }
            element.append(messages)
        }
        if let vCard = try await store.vCard(of: user), let parsed = XMLFragmentParser.parse(vCard.xml) {
            element.append(parsed)
        }
        let documents = try await store.allPrivateXML(of: user).compactMap { XMLFragmentParser.parse($0) }
        if !documents.isEmpty {
            var query = XMLElement(name: "query", namespace: "jabber:iq:private")
            for document in documents { query.append(document) }
            element.append(query)
        }
        let blocked = try await store.blocklist(of: user)
        if !blocked.isEmpty {
            var list = XMLElement(name: "blocklist", namespace: "urn:xmpp:blocking")
            for item in blocked { list.append(XMLElement(name: "item", namespace: "urn:xmpp:blocking", attributes: ["jid": item.description])) }
            element.append(list)
        }
        if let archive = try await exportArchive(of: user, store: store) { element.append(archive) }
        return element
    }

    /// `<archive xmlns='urn:xmpp:pie:0#mam'/>`: every archived message as a MAM result, oldest first.
    private static func exportArchive(of user: JID, store: any StarlingStore) async throws -> XMLElement? {
        var archive = XMLElement(name: "archive", namespace: archiveNamespace)
        var after: String?
        while true {
            let page = try await store.archivedMessages(in: user, matching: ArchiveFilter(after: after), limit: 1000, fromEnd: false)
            for message in page.messages {
                guard let stanza = XMLFragmentParser.parse(message.stanza) else { continue }
                var forwarded = XMLElement(name: "forwarded", namespace: forward)
                forwarded.append(XMLElement(name: "delay", namespace: "urn:xmpp:delay", attributes: ["stamp": XMPPDateTime.string(message.date)]))
                forwarded.append(stanza)
                var result = XMLElement(name: "result", namespace: mam, attributes: ["id": message.id])
                result.append(forwarded)
                archive.append(result)
            }
            guard !page.complete, let last = page.messages.last else { break }
            after = last.id
        }
        return archive.elements.isEmpty ? nil : archive
    }
}
