import Foundation
import StarlingAPI
import StarlingLua
import StarlingSASL
import StarlingStorage

/// Reads a Prosody data folder (its `internal` storage: one folder per host, one Lua data file per account
/// and store) into accounts: accounts (`internal_hashed` SCRAM-SHA-1 keys, or `internal_plain` passwords),
/// roster with pending requests, vCard, private XML, offline messages, blocklist and message archive.
public enum ProsodyImport {
    /// Stores Prosody keeps that are read, and those known but not carried over (with why).
    static let ignored: [String: String] = [
        "pep": "PEP nodes", "account_details": "registration details", "archive_cleanup": "",
        "cron": "", "smacks_h": "", "account_roles": "", "invites": "invitations", "lastlog": "",
    ]

    /// Every account of every host folder in `dataDirectory`.
    public static func read(dataDirectory: String) throws(ImportError) -> [ImportedAccount] {
        let root = URL(fileURLWithPath: dataDirectory)
        guard let hostFolders = try? FileManager.default.contentsOfDirectory(atPath: root.path) else {
            throw ImportError("\(dataDirectory): cannot read the folder (Prosody's data_path)")
        }
        var accounts: [ImportedAccount] = []
        for folder in hostFolders.sorted() {
            let hostPath = root.appendingPathComponent(folder)
            let accountsPath = hostPath.appendingPathComponent("accounts")
            guard FileManager.default.fileExists(atPath: accountsPath.path) else { continue }
            let host = decode(folder)
            let users = ((try? FileManager.default.contentsOfDirectory(atPath: accountsPath.path)) ?? [])
                .filter { $0.hasSuffix(".dat") }.map { decode(String($0.dropLast(4))) }.sorted()
            for user in users { accounts.append(try readAccount(user, host: host, folder: hostPath)) }
        }
        if accounts.isEmpty { throw ImportError("\(dataDirectory): no host folder with accounts (is this Prosody's data_path?)") }
        return accounts
    }

    /// Prosody's file names: every byte but letters and digits as %xx.
    static func decode(_ name: String) -> String { name.removingPercentEncoding ?? name }

    static func encode(_ name: String) -> String {
        var out = ""
        for byte in name.utf8 {
            if (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) {
                out.append(Character(UnicodeScalar(byte)))
            } else {
                out += String(format: "%%%02x", byte)
            }
        }
        return out
    }

    private static func load(_ folder: URL, _ store: String, _ user: String, list: Bool = false) throws(ImportError) -> LuaData? {
        let path = folder.appendingPathComponent(store).appendingPathComponent(encode(user) + (list ? ".list" : ".dat")).path
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        do { return try LuaDataFile.read(path: path) } catch { throw ImportError(error.description) }
    }

    private static func readAccount(_ user: String, host: String, folder: URL) throws(ImportError) -> ImportedAccount {
        var account = ImportedAccount(username: user, host: host)
        let file = folder.appendingPathComponent("accounts").appendingPathComponent(encode(user) + ".dat").path
        guard let details = try load(folder, "accounts", user) else { throw ImportError("\(file): cannot read") }
        if let password = details["password"]?.text {
            account.password = password
        } else {
            guard let stored = details["stored_key"]?.text, let server = details["server_key"]?.text, let salt = details["salt"]?.bytes,
                  let iterations = details["iteration_count"]?.int else {
                throw ImportError("\(file): neither a password nor stored_key, server_key, salt and iteration_count")
            }
            // Prosody's internal_hashed keys are SCRAM-SHA-1, hex; the salt is used as the bytes it is.
            guard let storedKey = ImportedKeys.key(stored, length: SCRAMHash.sha1.outputByteCount),
                  let serverKey = ImportedKeys.key(server, length: SCRAMHash.sha1.outputByteCount) else {
                throw ImportError("\(file): stored_key and server_key are not SCRAM-SHA-1 keys in hex")
            }
            account.credentials = [SCRAMCredentials(hash: .sha1, salt: salt, iterations: iterations, storedKey: storedKey, serverKey: serverKey)]
        }
        guard let owner = try? JID(localpart: user, domainpart: host) else { throw ImportError("\(file): '\(user)@\(host)' is not a valid JID") }

        if let roster = try load(folder, "roster", user) {
            guard case .table(let pairs) = roster else { throw ImportError("\(folder.path)/roster/\(encode(user)).dat: not a table") }
            for pair in pairs {
                if pair.key == .bool(false) {
                    for (contact, _) in pair.value["pending"]?.fields ?? [] {
                        guard let from = JID(contact)?.bare else { continue }
                        let request = XMLElement(name: "presence", namespace: Namespace.client, attributes: ["type": "subscribe", "from": from.description, "to": owner.description])
                        account.pending.append((from, request.serialized(inheritedNamespace: Namespace.client)))
                    }
                    continue
                }
                guard let contact = pair.key.text.flatMap({ JID($0) })?.bare else { continue }
                let entry = pair.value
                account.roster.append(RosterItem(jid: contact, name: entry["name"]?.text, groups: (entry["groups"]?.fields ?? []).map(\.key).sorted(),
                                                 subscription: Subscription(rawValue: entry["subscription"]?.text ?? "none") ?? .none,
                                                 askSubscribe: entry["ask"]?.text == "subscribe", preApproved: entry["approved"] == .bool(true)))
            }
        }
        if let vCard = try load(folder, "vcard", user) {
            account.vCard = element(vCard, inherited: "vcard-temp")
        } else if let card = try load(folder, vCard4Store, user, list: true)?.array.last.flatMap({ element($0, inherited: "") }) {
            // mod_vcard_legacy (Debian's default) keeps the vCard as XEP-0292 in PEP, and the avatar as XEP-0084.
            let avatar = try load(folder, avatarMetadataStore, user, list: true)?.array.last.flatMap { element($0, inherited: "") }
            let data = try load(folder, avatarDataStore, user, list: true)?.array.last.flatMap { element($0, inherited: "") }
            account.vCard = vCardTemp(from: card, photoType: avatar?.child("info")?[attribute: "type"], photoData: data?.text)
        }
        if let documents = try load(folder, "private", user) {
            account.privateDocuments = documents.fields.compactMap { element($0.value, inherited: "") }
        }
        if let blocklist = try load(folder, "blocklist", user) {
            account.blocklist = blocklist.fields.compactMap { JID($0.key) }
        }
        if let offline = try load(folder, "offline", user, list: true) {
            for item in offline.array {
                guard var message = element(item, inherited: Namespace.client) else { continue }
                // Prosody keeps when it arrived as an attribute; clients expect XEP-0203.
                if let stamp = message[attribute: "stamp"] {
                    message[attribute: "stamp"] = nil
                    message.append(XMLElement(name: "delay", namespace: "urn:xmpp:delay", attributes: ["from": host, "stamp": stamp]).with(text: "Offline storage"))
                }
                account.offline.append(message.serialized(inheritedNamespace: Namespace.client))
            }
        }
        if let archive = try load(folder, "archive", user, list: true) {
            var sequence: UInt64 = 0
            for item in archive.array {
                guard var message = element(item, inherited: Namespace.client), let with = item["with"]?.text.flatMap({ JID($0) }) else { continue }
                let when = item["when"].flatMap { value -> Date? in
                    switch value {
                    case .integer(let seconds): Date(timeIntervalSince1970: Double(seconds))
                    case .number(let seconds): Date(timeIntervalSince1970: seconds)
                    default: nil
                    }
                } ?? message[attribute: "stamp"].flatMap(XMPPDateTime.date) ?? Date()
                message[attribute: "stamp"] = nil
                sequence += 1
                account.archive.append(ArchivedMessage(id: AccountImport.archiveID(at: when, sequence: sequence), with: with,
                                                       stanza: message.serialized(inheritedNamespace: Namespace.client), body: message.child("body")?.text))
            }
        }
        let stores = (try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? []
        let read = ["accounts", "roster", "vcard", "private", "blocklist", "offline", "archive", vCard4Store, avatarDataStore, avatarMetadataStore]
        for store in stores.sorted() where !read.contains(store) {
            let base = decode(store)
            let has = FileManager.default.fileExists(atPath: folder.appendingPathComponent(store).appendingPathComponent(encode(user) + ".dat").path)
                || FileManager.default.fileExists(atPath: folder.appendingPathComponent(store).appendingPathComponent(encode(user) + ".list").path)
            guard has else { continue }
            let what = ignored[base] ?? (base.hasPrefix("pep_") ? "PEP items" : "Prosody's '\(base)' store")
            if !what.isEmpty { account.skipped.append("\(what) (not imported)") }
        }
        return account
    }

    static let vCard4Store = "pep_urn%3axmpp%3avcard4"
    static let avatarDataStore = "pep_urn%3axmpp%3aavatar%3adata"
    static let avatarMetadataStore = "pep_urn%3axmpp%3aavatar%3ametadata"

    /// A XEP-0292 vCard as vcard-temp (XEP-0054), field by field, with the avatar as its photo.
    public static func vCardTemp(from card: XMLElement, photoType: String?, photoData: String?) -> XMLElement {
        let temp = "vcard-temp"
        var vCard = XMLElement(name: "vCard", namespace: temp)
        func value(_ child: XMLElement) -> String? {
            child.elements.first { ["text", "uri", "date", "date-time", "timestamp"].contains($0.name) }?.text
        }
        for field in card.elements {
            switch field.name {
            case "fn", "nickname", "bday", "note", "title", "role", "url":
                guard let text = value(field) else { continue }
                let name = field.name == "fn" ? "FN" : field.name.uppercased()
                vCard.append(XMLElement(name: name, namespace: temp).with(text: text))
            case "n":
                var n = XMLElement(name: "N", namespace: temp)
                for (from, to) in [("surname", "FAMILY"), ("given", "GIVEN"), ("additional", "MIDDLE"), ("prefix", "PREFIX"), ("suffix", "SUFFIX")] {
                    if let text = field.child(from)?.text, !text.isEmpty { n.append(XMLElement(name: to, namespace: temp).with(text: text)) }
                }
                if !n.elements.isEmpty { vCard.append(n) }
            case "email":
                guard let text = value(field) else { continue }
                var email = XMLElement(name: "EMAIL", namespace: temp)
                email.append(XMLElement(name: "USERID", namespace: temp).with(text: text))
                vCard.append(email)
            case "tel":
                guard let text = value(field) else { continue }
                var tel = XMLElement(name: "TEL", namespace: temp)
                tel.append(XMLElement(name: "NUMBER", namespace: temp).with(text: text.hasPrefix("tel:") ? String(text.dropFirst(4)) : text))
                vCard.append(tel)
            case "org":
                guard let text = value(field) else { continue }
                var org = XMLElement(name: "ORG", namespace: temp)
                org.append(XMLElement(name: "ORGNAME", namespace: temp).with(text: text))
                vCard.append(org)
            default:
                continue
            }
        }
        if let photoData = photoData?.filter({ !$0.isWhitespace }), !photoData.isEmpty {
            var photo = XMLElement(name: "PHOTO", namespace: temp)
            photo.append(XMLElement(name: "TYPE", namespace: temp).with(text: photoType ?? "image/png"))
            photo.append(XMLElement(name: "BINVAL", namespace: temp).with(text: photoData))
            vCard.append(photo)
        }
        return vCard
    }

    /// A stanza as Prosody stores it (`{ name = ..., attr = { xmlns = ..., ... }, child, "text", ... }`).
    public static func element(_ data: LuaData, inherited: String) -> XMLElement? {
        guard let name = data["name"]?.text else { return nil }
        var attributes: [String: String] = [:]
        var namespace = inherited
        for (key, value) in data["attr"]?.fields ?? [] {
            guard let text = value.text else { continue }
            if key == "xmlns" { namespace = text } else { attributes[key] = text }
        }
        var element = XMLElement(name: name, namespace: namespace, attributes: attributes)
        element.children = data.array.compactMap { child in
            if let text = child.text { return .text(text) }
            return self.element(child, inherited: namespace).map { .element($0) }
        }
        return element
    }
}
