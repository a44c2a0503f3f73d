import Foundation
import StarlingAPI
import StarlingStorage
import StarlingXML

/// A XEP-0313 query as the client sent it: the form's filters and the XEP-0059 paging.
public struct ArchiveQuery: Sendable, Equatable {
    public var queryID: String?
    public var filter = ArchiveFilter()
    /// RSM `<after/>` and `<before/>`; an empty `<before/>` asks for the last page.
    public var after: String?
    public var before: String?
    /// RSM `<max/>` (nil: the server's page size).
    public var max: Int?
    public var flip = false

    /// Why a query cannot run: the stanza error it gets.
    public struct Refusal: Error, Equatable {
        public let condition: StanzaErrorCondition
        public let text: String
    }

    /// Parses a `<query xmlns='urn:xmpp:mam:2'/>` payload.
    /// - Parameter fullText: whether the `{urn:xmpp:fulltext:0}fulltext` field is offered.
    public init(_ payload: XMLElement, fullText: Bool) throws(Refusal) {
        queryID = payload[attribute: "queryid"]
        if let x = payload.child("x", namespace: DataForm.namespace) {
            guard let form = DataForm(x), form.type == .submit else { throw Refusal(condition: .badRequest, text: "the query form must be of type submit") }
            for field in form.fields {
                let value = field.value ?? ""
                switch field.variable ?? "" {
                case "FORM_TYPE":
                    guard value == MAMNamespace.mam else { throw Refusal(condition: .badRequest, text: "FORM_TYPE must be \(MAMNamespace.mam)") }
                case "with":
                    guard let jid = JID(value) else { throw Refusal(condition: .badRequest, text: "'with' is not a JID: \(value)") }
                    filter.with = jid
                case "start":
                    guard let date = XMPPDateTime.date(value) else { throw Refusal(condition: .badRequest, text: "'start' is not a XEP-0082 date-time: \(value)") }
                    filter.start = date
                case "end":
                    guard let date = XMPPDateTime.date(value) else { throw Refusal(condition: .badRequest, text: "'end' is not a XEP-0082 date-time: \(value)") }
                    filter.end = date
                case "after-id":
                    filter.after = value
                case "before-id":
                    filter.before = value
                case "ids":
                    guard field.values.count <= 100 else { throw Refusal(condition: .policyViolation, text: "at most 100 ids per query") }
                    filter.ids = field.values
                case "include-groupchat":
                    // Accepted either way: accounts' archives never hold groupchat (rooms keep their own).
                    guard ["true", "false", "1", "0"].contains(value) else { throw Refusal(condition: .badRequest, text: "'include-groupchat' must be a boolean") }
                case MAMNamespace.fullTextField where fullText:
                    let words = value.trimmingCharacters(in: .whitespacesAndNewlines)
                    filter.text = words.isEmpty ? nil : words
                case let other:
                    // XEP-0313 §4.1.5: a field the server does not know is feature-not-implemented.
                    throw Refusal(condition: .featureNotImplemented, text: "unknown query field '\(other)'")
                }
            }
        }
        if let set = payload.child("set", namespace: MAMNamespace.rsm) {
            if let text = set.child("max", namespace: MAMNamespace.rsm)?.text {
                guard let value = Int(text.trimmingCharacters(in: .whitespaces)), value >= 0 else {
                    throw Refusal(condition: .badRequest, text: "RSM <max/> must be a number")
                }
                max = value
            }
            after = set.child("after", namespace: MAMNamespace.rsm)?.text
            before = set.child("before", namespace: MAMNamespace.rsm)?.text
            if set.child("index", namespace: MAMNamespace.rsm) != nil {
                throw Refusal(condition: .featureNotImplemented, text: "RSM <index/> is not supported; page with <after/> and <before/>")
            }
            if after != nil && before != nil {
                throw Refusal(condition: .badRequest, text: "RSM <after/> and <before/> together are undefined; use the after-id and before-id fields")
            }
        }
        flip = payload.child("flip-page", namespace: MAMNamespace.mam) != nil
    }

    /// Every id the query names, which the archive must hold (else `<item-not-found/>`).
    var namedIDs: [String] {
        var ids = [filter.after, filter.before, after, before].compactMap { $0 }.filter { !$0.isEmpty }
        ids += filter.ids ?? []
        return ids
    }
}

/// Runs queries against one archive and answers them (results as messages, then `<fin/>`): shared by
/// accounts' archives and rooms'.
public struct ArchiveQueryRunner: Sendable {
    public let store: any ArchiveStore
    public let pageSize: Int
    public let maxPageSize: Int

    public init(store: any ArchiveStore, pageSize: Int, maxPageSize: Int) {
        self.store = store
        self.pageSize = pageSize
        self.maxPageSize = maxPageSize
    }

    /// The query form (XEP-0313 §4.1.5).
    public func form() -> XMLElement {
        var fields = [
            DataForm.Field("with", type: "jid-single"), DataForm.Field("start", type: "text-single"), DataForm.Field("end", type: "text-single"),
            DataForm.Field("before-id", type: "text-single"), DataForm.Field("after-id", type: "text-single"),
            DataForm.Field("ids", type: "list-multi"), DataForm.Field("include-groupchat", type: "boolean"),
        ]
        if store.supportsFullTextSearch { fields.append(DataForm.Field(MAMNamespace.fullTextField, type: "text-single")) }
        var x = DataForm(type: .form, formType: MAMNamespace.mam, fields: fields).element
        // The ids field is open to any value (XEP-0122).
        for index in x.children.indices {
            guard case .element(var field) = x.children[index], field[attribute: "var"] == "ids" else { continue }
            var validate = XMLElement(name: "validate", namespace: "http://jabber.org/protocol/xdata-validate", attributes: ["datatype": "xs:string"])
            validate.append(XMLElement(name: "open", namespace: "http://jabber.org/protocol/xdata-validate"))
            field.append(validate)
            x.children[index] = .element(field)
        }
        var query = XMLElement(name: "query", namespace: MAMNamespace.mam)
        query.append(x)
        return query
    }

    /// Answers a query on `archive`: sends each result with `send` (oldest first, or newest first when
    /// flipped) and returns the `<fin/>` for the IQ result. `forwarded` turns a stored message into
    /// what the requester sees (rooms add real JIDs where allowed); nil leaves it out.
    public func run(_ query: ArchiveQuery, on archive: JID, send: (XMLElement) -> Void,
                    forwarded: (ArchivedMessage, XMLElement) -> XMLElement? = { $1 }) async throws -> IQResponse {
        let named = query.namedIDs
        if !named.isEmpty {
            let known = try await store.archivedIDs(in: archive, among: named)
            if let missing = named.first(where: { !known.contains($0) }) {
                return .error(.itemNotFound, text: "no message \(missing) in this archive")
            }
        }
        var filter = query.filter
        if let after = query.after { filter.after = [filter.after, after].compactMap { $0 }.max() }
        if let before = query.before, !before.isEmpty { filter.before = [filter.before, before].compactMap { $0 }.min() }
        var fin = XMLElement(name: "fin", namespace: MAMNamespace.mam)
        var set = XMLElement(name: "set", namespace: MAMNamespace.rsm)
        if query.max == 0 {
            // RSM §2.6: only the number of matches.
            let count = try await store.archivedCount(in: archive, matching: filter)
            set.append(XMLElement(name: "count", namespace: MAMNamespace.rsm).with(text: String(count)))
            fin.append(set)
            return .result(fin)
        }
        let limit = min(query.max ?? pageSize, maxPageSize)
        let page = try await store.archivedMessages(in: archive, matching: filter, limit: limit, fromEnd: query.before != nil)
        for message in query.flip ? page.messages.reversed() : page.messages {
            guard let stored = XMLFragmentParser.parse(message.stanza), let shown = forwarded(message, stored) else { continue }
            send(Self.result(shown, id: message.id, queryID: query.queryID, date: message.date))
        }
        if page.complete { fin[attribute: "complete"] = "true" }
        if let first = page.messages.first, let last = page.messages.last {
            set.append(XMLElement(name: "first", namespace: MAMNamespace.rsm).with(text: first.id))
            set.append(XMLElement(name: "last", namespace: MAMNamespace.rsm).with(text: last.id))
        }
        fin.append(set)
        return .result(fin)
    }

    /// `<metadata/>` (XEP-0313 §5): the archive's first and last message.
    public func metadata(of archive: JID) async throws -> XMLElement {
        var metadata = XMLElement(name: "metadata", namespace: MAMNamespace.mam)
        if let bounds = try await store.archiveBounds(of: archive) {
            metadata.append(XMLElement(name: "start", namespace: MAMNamespace.mam, attributes: ["id": bounds.first.id, "timestamp": XMPPDateTime.string(bounds.first.date)]))
            metadata.append(XMLElement(name: "end", namespace: MAMNamespace.mam, attributes: ["id": bounds.last.id, "timestamp": XMPPDateTime.string(bounds.last.date)]))
        }
        return metadata
    }

    /// One result: `<message><result id queryid><forwarded><delay/>original</forwarded></result></message>`.
    static func result(_ message: XMLElement, id: String, queryID: String?, date: Date) -> XMLElement {
        var forwarded = XMLElement(name: "forwarded", namespace: MAMNamespace.forward)
        forwarded.append(XMLElement(name: "delay", namespace: MAMNamespace.delay, attributes: ["stamp": XMPPDateTime.string(date)]))
        forwarded.append(message)
        var result = XMLElement(name: "result", namespace: MAMNamespace.mam, attributes: ["id": id])
        if let queryID { result[attribute: "queryid"] = queryID }
        result.append(forwarded)
        var wrapper = XMLElement(name: "message", namespace: Namespace.client, attributes: ["id": StanzaID.next()])
        wrapper.append(result)
        return wrapper
    }
}
