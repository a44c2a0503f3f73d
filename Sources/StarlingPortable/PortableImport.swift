import Foundation
#if canImport(FoundationXML)
private import FoundationXML
#endif
import StarlingAPI
import StarlingSASL
import StarlingStorage

/// Reads XEP-0227 files (Starling's and ejabberd's `export_piefxis`, which splits hosts into files joined by
/// XInclude) into accounts. Anything it does not understand is an error naming the element, the file and
/// the line: an import never reports success for a document it did not read.
public enum PortableImport {
    static let xinclude = "http://www.w3.org/2001/XInclude"
    static let mam = "urn:xmpp:mam:2"
    static let forward = "urn:xmpp:forward:0"

    /// XEP-0227 data this importer recognizes but does not carry over, with the summary's wording.
    static let notImported: [String: String] = [
        "jabber:iq:privacy": "privacy lists",
        "http://jabber.org/protocol/pubsub": "PEP/PubSub nodes",
        "http://jabber.org/protocol/pubsub#owner": "PEP/PubSub nodes",
        "urn:xmpp:pie:0#pep": "PEP/PubSub nodes",
    ]

    /// The accounts of `path`, a `<server-data/>` file (its `xi:include`d host files read from the same
    /// folder, never outside it) or a single `<host/>` file.
    public static func read(path: String) throws(ImportError) -> [ImportedAccount] {
        let file = URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath()
        let folder = file.deletingLastPathComponent()
        let root = try parse(file)
        switch (root.namespace, root.name) {
        case (PortableData.namespace, "server-data"):
            var accounts: [ImportedAccount] = []
            for child in root.elements {
                switch (child.namespace, child.name) {
                case (PortableData.namespace, "host"):
                    accounts += try readHost(child)
                case (xinclude, "include"):
                    let included = try parse(try resolve(child, in: folder))
                    guard included.namespace == PortableData.namespace, included.name == "host" else {
                        throw included.error("an included file must hold one <host xmlns='\(PortableData.namespace)'/>, not <\(included.name)/>")
                    }
                    accounts += try readHost(included)
                default:
                    throw child.error("unexpected <\(child.name) xmlns='\(child.namespace)'/> in <server-data/> (expected <host/> or <xi:include/>)")
                }
            }
            return accounts
        case (PortableData.namespace, "host"):
            return try readHost(root)
        default:
            throw root.error("not a XEP-0227 document: the root is <\(root.name) xmlns='\(root.namespace)'/>, expected <server-data xmlns='\(PortableData.namespace)'/> or <host/>")
        }
    }

    /// The file an `xi:include` names: relative to the export's folder and inside it.
    private static func resolve(_ include: ImportNode, in folder: URL) throws(ImportError) -> URL {
        guard let href = include.attributes["href"], !href.isEmpty else { throw include.error("<xi:include/> without href") }
        if href.contains("://") || href.hasPrefix("/") || href.hasPrefix("file:") {
            throw include.error("<xi:include href='\(href)'/>: only files in the export's folder are read (a relative path, no URL)")
        }
        if let parse = include.attributes["parse"], parse != "xml" { throw include.error("<xi:include parse='\(parse)'/> is not supported") }
        let target = folder.appendingPathComponent(href).standardizedFileURL.resolvingSymlinksInPath()
        guard target.path.hasPrefix(folder.path + "/") else {
            throw include.error("<xi:include href='\(href)'/> leads outside the export's folder \(folder.path)")
        }
        return target
    }

    private static func readHost(_ host: ImportNode) throws(ImportError) -> [ImportedAccount] {
        guard let domain = host.attributes["jid"], let jid = JID(domain), jid.localpart == nil, jid.resourcepart == nil else {
            throw host.error("<host/> needs a jid attribute naming a domain")
        }
        var accounts: [ImportedAccount] = []
        for user in host.elements {
            guard user.namespace == PortableData.namespace, user.name == "user" else {
                throw user.error("unexpected <\(user.name) xmlns='\(user.namespace)'/> in <host/> (expected <user/>)")
            }
            accounts.append(try readUser(user, host: jid.domainpart))
        }
        return accounts
    }

    private static func readUser(_ user: ImportNode, host: String) throws(ImportError) -> ImportedAccount {
        guard let name = user.attributes["name"], !name.isEmpty else { throw user.error("<user/> without a name") }
        var account = ImportedAccount(username: name, host: host)
        account.password = user.attributes["password"].flatMap { $0.isEmpty ? nil : $0 }
        var archiveSequence: UInt64 = 0
        for child in user.elements {
            switch (child.namespace, child.name) {
            case (PortableData.scramNamespace, "scram-credentials"):
                account.credentials.append(try credentials(child))
            case ("jabber:iq:roster", "query"):
                for item in child.elements {
                    guard item.name == "item", let jid = item.attributes["jid"].flatMap({ JID($0) }) else {
                        throw item.error("a roster <\(item.name)/> without a valid jid")
                    }
                    guard let subscription = Subscription(rawValue: item.attributes["subscription"] ?? "none") else {
                        throw item.error("subscription='\(item.attributes["subscription"] ?? "")' is not none, to, from, both or remove")
                    }
                    account.roster.append(RosterItem(jid: jid.bare, name: item.attributes["name"], groups: item.elements.filter { $0.name == "group" }.map(\.text),
                                                     subscription: subscription, askSubscribe: item.attributes["ask"] == "subscribe",
                                                     preApproved: item.attributes["approved"] == "true"))
                }
            case (_, "presence") where child.namespace == Namespace.client || child.namespace == PortableData.namespace:
                guard child.attributes["type"] == "subscribe", let from = child.attributes["from"].flatMap({ JID($0) }) else {
                    throw child.error("a <presence/> in <user/> must be a subscription request with a from")
                }
                account.pending.append((from.bare, child.element(namespace: Namespace.client).serialized(inheritedNamespace: Namespace.client)))
            case (PortableData.namespace, "offline-messages"):
                for message in child.elements {
                    guard message.name == "message" else { throw message.error("unexpected <\(message.name)/> in <offline-messages/>") }
                    account.offline.append(message.element(namespace: Namespace.client).serialized(inheritedNamespace: Namespace.client))
                }
            case ("vcard-temp", "vCard"):
                account.vCard = child.element(namespace: "vcard-temp")
            case ("jabber:iq:private", "query"):
                account.privateDocuments += child.elements.map { $0.element(namespace: $0.namespace) }
            case ("urn:xmpp:blocking", "blocklist"):
                account.blocklist += child.elements.compactMap { $0.attributes["jid"].flatMap { JID($0) } }
            case (PortableData.archiveNamespace, "archive"):
                for result in child.elements where result.name == "result" && result.namespace == mam {
                    guard let forwarded = result.elements.first(where: { $0.name == "forwarded" }),
                          let message = forwarded.elements.first(where: { $0.name == "message" }) else {
                        throw result.error("an archived <result/> without <forwarded><message/></forwarded>")
                    }
                    let stanza = message.element(namespace: Namespace.client)
                    let from = stanza[attribute: "from"].flatMap { JID($0) }, to = stanza[attribute: "to"].flatMap { JID($0) }
                    let owner = try? JID(localpart: name, domainpart: host)
                    guard let with = from?.bare == owner ? to : from else { throw message.error("an archived message without from and to") }
                    let id: String
                    if let given = result.attributes["id"], StanzaID.parts(of: given) != nil {
                        id = given
                    } else {
                        let stamp = forwarded.elements.first { $0.name == "delay" }?.attributes["stamp"].flatMap(XMPPDateTime.date) ?? Date()
                        archiveSequence += 1
                        id = AccountImport.archiveID(at: stamp, sequence: archiveSequence)
                    }
                    account.archive.append(ArchivedMessage(id: id, with: with, stanza: stanza.serialized(inheritedNamespace: Namespace.client),
                                                           body: stanza.child("body")?.text))
                }
            default:
                if let what = notImported[child.namespace] {
                    account.skipped.append("\(what) (not imported)")
                    continue
                }
                throw child.error("unexpected <\(child.name) xmlns='\(child.namespace)'/> in <user name='\(name)'/>")
            }
        }
        return account
    }

    /// `<scram-credentials/>`, in Starling's form (base64) or ejabberd's (base64 of the base64 it stores).
    private static func credentials(_ node: ImportNode) throws(ImportError) -> SCRAMCredentials {
        let mechanism = node.attributes["mechanism"] ?? ""
        guard let hash = SCRAMHash.allCases.first(where: { $0.mechanism(plus: false) == mechanism }) else {
            throw node.error("SCRAM mechanism '\(mechanism)' is not SCRAM-SHA-1 or SCRAM-SHA-256")
        }
        func field(_ name: String) throws(ImportError) -> String {
            guard let value = node.elements.first(where: { $0.name == name })?.text, !value.isEmpty else { throw node.error("<scram-credentials/> without <\(name)/>") }
            return value
        }
        let length = hash.outputByteCount
        let storedText = try field("stored-key"), serverText = try field("server-key"), saltText = try field("salt")
        guard let iterations = Int(try field("iter-count")), iterations > 0 else { throw node.error("<iter-count/> is not a positive number") }
        guard let storedKey = ImportedKeys.key(storedText, length: length), let serverKey = ImportedKeys.key(serverText, length: length),
              let salt = ImportedKeys.salt(saltText, doubled: ImportedKeys.isDoubled(storedText, length: length)), !salt.isEmpty else {
            throw node.error("\(mechanism) keys that are not \(length)-byte base64 (once or twice) or hex")
        }
        return SCRAMCredentials(hash: hash, salt: salt, iterations: iterations, storedKey: storedKey, serverKey: serverKey)
    }

    // MARK: Reading XML with line numbers

    static func parse(_ file: URL) throws(ImportError) -> ImportNode {
        guard let data = FileManager.default.contents(atPath: file.path) else { throw ImportError("\(file.path): cannot read") }
        let builder = ImportTreeBuilder(file: file.path)
        let parser = XMLParser(data: data)
        parser.shouldProcessNamespaces = true
        parser.shouldResolveExternalEntities = false
        parser.delegate = builder
        let parsed = parser.parse()
        if parsed, let open = builder.stack.last {
            throw ImportError("\(file.path):\(parser.lineNumber): not well-formed XML (the file ends inside <\(open.name)/> of line \(open.line))")
        }
        guard parsed, let root = builder.root else {
            let line = builder.failureLine ?? parser.lineNumber
            throw ImportError("\(file.path):\(line): not well-formed XML (\(parser.parserError.map { "\($0.localizedDescription)" } ?? "parse error"))")
        }
        return root
    }
}

/// An element of an import file, with where it starts.
final class ImportNode {
    enum Child {
        case element(ImportNode)
        case text(String)
    }

    let name: String
    let namespace: String
    let attributes: [String: String]
    let file: String
    let line: Int
    var children: [Child] = []

    init(name: String, namespace: String, attributes: [String: String], file: String, line: Int) {
        self.name = name
        self.namespace = namespace
        self.attributes = attributes
        self.file = file
        self.line = line
    }

    var elements: [ImportNode] {
        children.compactMap { if case .element(let node) = $0 { node } else { nil } }
    }

    var text: String {
        children.map { if case .text(let text) = $0 { text } else { "" } }.joined()
    }

    func error(_ message: String) -> ImportError { ImportError("\(file):\(line): \(message)") }

    /// This subtree as a stanza tree; `namespace` is what an element without one of its own is in.
    func element(namespace fallback: String) -> StarlingAPI.XMLElement {
        let own = namespace.isEmpty ? fallback : namespace
        var element = StarlingAPI.XMLElement(name: name, namespace: own, attributes: attributes)
        element.children = children.map { child in
            switch child {
            case .element(let node): .element(node.element(namespace: own))
            case .text(let text): .text(text)
            }
        }
        return element
    }
}

/// Builds `ImportNode` trees from the SAX events of Foundation's XMLParser (libxml2), which knows lines.
private final class ImportTreeBuilder: NSObject, XMLParserDelegate {
    let file: String
    var root: ImportNode?
    var stack: [ImportNode] = []
    var failureLine: Int?

    init(file: String) { self.file = file }

    func parser(_ parser: XMLParser, didStartElement elementName: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        let node = ImportNode(name: elementName, namespace: namespaceURI ?? "", attributes: attributes, file: file, line: parser.lineNumber)
        if let parent = stack.last { parent.children.append(.element(node)) } else { root = node }
        stack.append(node)
    }

    func parser(_ parser: XMLParser, didEndElement elementName: String, namespaceURI: String?, qualifiedName: String?) {
        stack.removeLast()
    }

    func parser(_ parser: XMLParser, foundCharacters string: String) {
        stack.last?.children.append(.text(string))
    }

    func parser(_ parser: XMLParser, parseErrorOccurred parseError: any Error) {
        failureLine = parser.lineNumber
    }
}
