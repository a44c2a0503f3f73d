import Foundation
import StarlingAPI
import StarlingModules
import StarlingSASL
import StarlingStorage
import StarlingXML

/// XEP-0227 portable import/export: every account with its SCRAM keys (never a password), roster,
/// pending subscription requests, offline messages, vCard, private XML, blocklist and message archive.
public enum PortableData {
    public static let namespace = "urn:xmpp:pie:0"
    public static let scramNamespace = "urn:xmpp:pie:0#scram"
    public static let archiveNamespace = "urn:xmpp:pie:0#mam"
    private static let mam = "urn:xmpp:mam:2"
    private static let forward = "urn:xmpp:forward:0"

    public struct Summary: Sendable, CustomStringConvertible {
        public var accounts = 0
        public var skipped: [String] = []
        public var description: String {
            "\(accounts) account(s)" + (skipped.isEmpty ? "" : "; skipped (already present): \(skipped.joined(separator: ", "))")
        }
    }

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

    /// Stores an imported `<archive/>`. Ids from Starling are kept; others (another server's) are made
    /// anew from the message's time, in document order, so the archive keeps its order.
    private static func importArchive(_ archive: XMLElement, of user: JID, store: any StarlingStore) async throws {
        var batch: [(archive: JID, message: ArchivedMessage)] = []
        var sequence: UInt64 = 0
        for result in archive.elements where result.name == "result" && result.namespace == mam {
            guard let forwarded = result.child("forwarded", namespace: forward), let message = forwarded.child("message") else { continue }
            let id: String
            if let given = result[attribute: "id"], StanzaID.parts(of: given) != nil {
                id = given
            } else {
                let date = forwarded.child("delay", namespace: "urn:xmpp:delay")?[attribute: "stamp"].flatMap(XMPPDateTime.date) ?? Date()
                sequence += 1
                id = StanzaID.make(stamp: StanzaID.firstStamp(at: date) | (sequence & 0xFFFF), random: UInt32.random(in: 0...UInt32.max))
            }
            let from = message[attribute: "from"].flatMap { JID($0) }
            let to = message[attribute: "to"].flatMap { JID($0) }
            guard let with = from?.bare == user ? to : from else { continue }
            batch.append((user, ArchivedMessage(id: id, with: with, stanza: message.serialized(inheritedNamespace: Namespace.client),
                                                body: message.child("body")?.text)))
            if batch.count == 1000 {
                try await store.archive(batch)
                batch = []
            }
        }
        try await store.archive(batch)
    }

    public struct ImportError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Imports a `<server-data/>` document. Accounts that already exist are left untouched.
    public static func `import`(_ text: String, into store: any StarlingStore, hosts: [String]) async throws -> Summary {
        let parser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: max(1 << 20, text.utf8.count + 1), maxDepth: 64))
        let events: [XMLStreamEvent]
        do { events = try parser.feed(text) } catch { throw ImportError(description: "not a valid XEP-0227 file: \(error)") }
        guard case .streamOpen(let root, _)? = events.first, root.name == "server-data", root.namespace == namespace else {
            throw ImportError(description: "the document element must be <server-data xmlns='\(namespace)'/>")
        }
        var summary = Summary()
        for case .stanza(let hostElement) in events where hostElement.name == "host" {
            guard let host = hostElement[attribute: "jid"], hosts.contains(host) else {
                throw ImportError(description: "host '\(hostElement[attribute: "jid"] ?? "")' is not configured here")
            }
            for userElement in hostElement.elements where userElement.name == "user" {
                guard let username = userElement[attribute: "name"], let user = try? JID(localpart: username, domainpart: host) else {
                    throw ImportError(description: "invalid user name '\(userElement[attribute: "name"] ?? "")' on \(host)")
                }
                if try await store.accountExists(username: user.localpart!, host: host) {
                    summary.skipped.append(user.description)
                    continue
                }
                try await importUser(userElement, user: user, store: store)
                summary.accounts += 1
            }
        }
        return summary
    }

    private static func importUser(_ element: XMLElement, user: JID, store: any StarlingStore) async throws {
        var credentials: [SCRAMCredentials] = []
        for scram in element.elements where scram.name == "scram-credentials" {
            let mechanism = scram[attribute: "mechanism"] ?? ""
            guard let hash = SCRAMHash.allCases.first(where: { $0.mechanism(plus: false) == mechanism }),
                  let iterations = scram.child("iter-count").flatMap({ Int($0.text) }),
                  let salt = scram.child("salt").flatMap({ Data(base64Encoded: $0.text) }),
                  let serverKey = scram.child("server-key").flatMap({ Data(base64Encoded: $0.text) }),
                  let storedKey = scram.child("stored-key").flatMap({ Data(base64Encoded: $0.text) })
            else { throw ImportError(description: "malformed SCRAM credentials for \(user)") }
            credentials.append(SCRAMCredentials(hash: hash, salt: Array(salt), iterations: iterations, storedKey: Array(storedKey), serverKey: Array(serverKey)))
        }
        if credentials.isEmpty, let password = element[attribute: "password"] {
            // Older exports carry the password itself: derive keys and forget it.
            credentials = SCRAMHash.allCases.map { SCRAMCredentials.generate(password: password, hash: $0, iterations: 4096) }
        }
        try await store.createAccount(username: user.localpart!, host: user.domainpart, credentials: credentials)
        for child in element.elements {
            switch (child.namespace, child.name) {
            case ("jabber:iq:roster", "query"):
                for item in child.elements where item.name == "item" {
                    guard let jid = item[attribute: "jid"].flatMap({ JID($0) }) else { continue }
                    _ = try await store.put(RosterItem(
                        jid: jid.bare, name: item[attribute: "name"], groups: item.elements.filter { $0.name == "group" }.map(\.text),
                        subscription: Subscription(rawValue: item[attribute: "subscription"] ?? "none") ?? .none,
                        askSubscribe: item[attribute: "ask"] == "subscribe", preApproved: item[attribute: "approved"] == "true"
                    ), for: user)
                }
            case (_, "presence") where child[attribute: "type"] == "subscribe":
                if let from = child[attribute: "from"].flatMap({ JID($0) }) {
                    try await store.addPendingSubscription(from: from.bare, to: user, stanza: child.serialized(inheritedNamespace: Namespace.client))
                }
            case (namespace, "offline-messages"):
                for message in child.elements where message.name == "message" {
                    _ = try await store.storeOffline(message.serialized(inheritedNamespace: Namespace.client), for: user, limit: Int.max)
                }
            case ("vcard-temp", "vCard"):
                try await store.setVCard(child.serialized(), photoHash: VCardModule.photoHash(child), of: user)
            case ("jabber:iq:private", "query"):
                for document in child.elements {
                    try await store.setPrivateXML(document.serialized(), of: user, name: document.name, namespace: document.namespace)
                }
            case ("urn:xmpp:blocking", "blocklist"):
                try await store.block(child.elements.compactMap { $0[attribute: "jid"].flatMap { JID($0) } }, for: user)
            case (archiveNamespace, "archive"):
                try await importArchive(child, of: user, store: store)
            default:
                continue
            }
        }
    }
}
