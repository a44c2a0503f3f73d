import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// What a MAM test needs of a client: queries, and reading their results.
enum MAM {
    static let ns = "urn:xmpp:mam:2"
    static let rsm = "http://jabber.org/protocol/rsm"
    static let sid = "urn:xmpp:sid:0"

    struct Page {
        /// The forwarded messages, in the order they arrived.
        var messages: [XMLElement]
        /// The result ids, in the same order.
        var ids: [String]
        var fin: XMLElement
        var complete: Bool { fin[attribute: "complete"] == "true" }
        var first: String? { fin.child("set", namespace: rsm)?.child("first", namespace: rsm)?.text }
        var last: String? { fin.child("set", namespace: rsm)?.child("last", namespace: rsm)?.text }
        var bodies: [String] { messages.compactMap { $0.child("body")?.text } }
    }

    struct Refused: Error {
        let condition: String
        let stanza: XMLElement
    }

    static func form(_ fields: [String: [String]]) -> String {
        guard !fields.isEmpty else { return "" }
        let body = fields.sorted { $0.key < $1.key }.map { field in
            "<field var='\(field.key)'>" + field.value.map { "<value>\($0)</value>" }.joined() + "</field>"
        }.joined()
        return "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>\(ns)</value></field>\(body)</x>"
    }

    /// Runs one query on `archive` (nil: the account's own) and reads its results and `<fin/>`.
    static func query(_ client: TestClient, archive: String? = nil, fields: [String: [String]] = [:], rsm: String = "", extra: String = "") async throws -> Page {
        let id = "q-\(UUID().uuidString.prefix(8))"
        let to = archive.map { " to='\($0)'" } ?? ""
        client.send("<iq type='set' id='\(id)'\(to)><query xmlns='\(ns)' queryid='\(id)'>\(form(fields))\(rsm.isEmpty ? "" : "<set xmlns='\(Self.rsm)'>\(rsm)</set>")\(extra)</query></iq>")
        var messages: [XMLElement] = []
        var ids: [String] = []
        while true {
            let stanza = try await client.expect("results of \(id)") {
                ($0.name == "iq" && $0[attribute: "id"] == id) || ($0.name == "message" && $0.child("result", namespace: ns)?[attribute: "queryid"] == id)
            }
            if stanza.name == "iq" {
                if stanza[attribute: "type"] == "error" { throw Refused(condition: MUC.errorCondition(stanza) ?? "?", stanza: stanza) }
                guard let fin = stanza.child("fin", namespace: ns) else { throw TestClientError.unexpected("no <fin/> in \(stanza)") }
                return Page(messages: messages, ids: ids, fin: fin)
            }
            let result = stanza.child("result", namespace: ns)!
            XCTAssertNotNil(result.child("forwarded", namespace: "urn:xmpp:forward:0")?.child("delay", namespace: "urn:xmpp:delay")?[attribute: "stamp"])
            if let message = result.child("forwarded", namespace: "urn:xmpp:forward:0")?.child("message") { messages.append(message) }
            ids.append(result[attribute: "id"] ?? "")
        }
    }

    /// The error condition a query gets.
    static func refusal(_ client: TestClient, archive: String? = nil, fields: [String: [String]] = [:], rsm: String = "", extra: String = "") async throws -> String {
        do {
            let page = try await query(client, archive: archive, fields: fields, rsm: rsm, extra: extra)
            XCTFail("query answered: \(page.fin)")
            return ""
        } catch let refused as Refused {
            return refused.condition
        }
    }

    /// The stanza-id `by` put on a delivered message.
    static func stanzaID(_ message: XMLElement, by: String) -> String? {
        message.elements.first { $0.name == "stanza-id" && $0.namespace == sid && $0[attribute: "by"] == by }?[attribute: "id"]
    }

    static func chat(_ client: TestClient, to: String, _ body: String, extra: String = "") {
        client.send("<message to='\(to)' type='chat' id='\(UUID().uuidString.prefix(8))'><body>\(body)</body>\(extra)</message>")
    }

    static func received(_ client: TestClient, _ body: String) async throws -> XMLElement {
        try await client.expect("message '\(body)'") { $0.name == "message" && $0.child("body")?.text == body }
    }
}
