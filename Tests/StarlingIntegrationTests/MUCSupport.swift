import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// What a MUC test needs of a client: joining rooms and reading the room's answers.
enum MUC {
    static let muc = "http://jabber.org/protocol/muc"
    static let user = "http://jabber.org/protocol/muc#user"
    static let admin = "http://jabber.org/protocol/muc#admin"
    static let owner = "http://jabber.org/protocol/muc#owner"
    static let service = "conference.localhost"

    /// What a join brought: the other occupants' presence (in order), the own presence, the history and
    /// the subject message.
    struct Joined {
        var roster: [XMLElement]
        var own: XMLElement
        var history: [XMLElement]
        var subject: XMLElement
    }

    static func statuses(_ stanza: XMLElement) -> Set<Int> {
        Set(stanza.child("x", namespace: user)?.elements.filter { $0.name == "status" }.compactMap { $0[attribute: "code"].flatMap(Int.init) } ?? [])
    }

    static func item(_ stanza: XMLElement) -> XMLElement? {
        stanza.child("x", namespace: user)?.child("item", namespace: user)
    }

    static func errorCondition(_ stanza: XMLElement) -> String? {
        stanza.child("error")?.elements.first { $0.namespace == Namespace.stanzaErrors }?.name
    }

    static func joinStanza(_ room: String, nick: String, password: String? = nil, history: String = "") -> String {
        let secret = password.map { "<password>\($0)</password>" } ?? ""
        return "<presence to='\(room)@\(service)/\(nick)'><x xmlns='\(muc)'>\(secret)\(history)</x></presence>"
    }

    /// Joins and reads everything the room sends a newcomer (through the subject).
    static func join(_ client: TestClient, _ room: String, nick: String, password: String? = nil, history: String = "") async throws -> Joined {
        client.send(joinStanza(room, nick: nick, password: password, history: history))
        return try await readJoin(client, room, nick: nick)
    }

    static func readJoin(_ client: TestClient, _ room: String, nick: String) async throws -> Joined {
        let roomJID = "\(room)@\(service)"
        var roster: [XMLElement] = []
        var own: XMLElement?
        while own == nil {
            let presence = try await client.expect("presence from \(roomJID)") {
                $0.name == "presence" && ($0[attribute: "from"] ?? "").hasPrefix(roomJID)
            }
            if presence[attribute: "type"] == "error" { throw JoinRefused(condition: errorCondition(presence) ?? "?", stanza: presence) }
            if statuses(presence).contains(110) { own = presence } else { roster.append(presence) }
        }
        var history: [XMLElement] = []
        while true {
            let message = try await client.expect("history or subject from \(roomJID)") {
                $0.name == "message" && ($0[attribute: "from"] ?? "").hasPrefix(roomJID) && $0[attribute: "type"] == "groupchat"
            }
            if message.child("subject") != nil && message.child("body") == nil { return Joined(roster: roster, own: own!, history: history, subject: message) }
            history.append(message)
        }
    }

    /// A join the room refuses: the error condition.
    static func refusedJoin(_ client: TestClient, _ room: String, nick: String, password: String? = nil) async throws -> String {
        do {
            _ = try await join(client, room, nick: nick, password: password)
            return "joined"
        } catch let refused as JoinRefused {
            return refused.condition
        }
    }

    struct JoinRefused: Error {
        let condition: String
        let stanza: XMLElement
    }

    /// Creates a room and accepts the default configuration (an instant room).
    @discardableResult
    static func createInstantRoom(_ client: TestClient, _ room: String, nick: String) async throws -> Joined {
        let joined = try await join(client, room, nick: nick)
        XCTAssertTrue(statuses(joined.own).contains(201), "a new room says so: \(joined.own.serialized())")
        let result = try await client.iq("<iq type='set' to='\(room)@\(service)' id='create-\(room)'><query xmlns='\(owner)'><x xmlns='jabber:x:data' type='submit'/></query></iq>",
                                         id: "create-\(room)")
        XCTAssertEqual(result[attribute: "type"], "result", result.serialized())
        return joined
    }

    /// Configures a room with the given `muc#roomconfig_` fields (values as the form wants them).
    static func configure(_ client: TestClient, _ room: String, _ fields: [String: [String]]) async throws -> XMLElement {
        var form = "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>"
        for (name, values) in fields.sorted(by: { $0.key < $1.key }) {
            form += "<field var='muc#roomconfig_\(name)'>" + values.map { "<value>\($0)</value>" }.joined() + "</field>"
        }
        let id = "config-\(UUID().uuidString.prefix(8))"
        return try await client.iq("<iq type='set' to='\(room)@\(service)' id='\(id)'><query xmlns='\(owner)'><x xmlns='jabber:x:data' type='submit'>\(form)</x></query></iq>", id: id)
    }

    static func admin(_ client: TestClient, _ room: String, _ items: String) async throws -> XMLElement {
        let id = "admin-\(UUID().uuidString.prefix(8))"
        return try await client.iq("<iq type='set' to='\(room)@\(service)' id='\(id)'><query xmlns='\(admin)'>\(items)</query></iq>", id: id)
    }

    static func groupchat(_ client: TestClient, _ room: String, _ body: String, id: String = UUID().uuidString) {
        client.send("<message to='\(room)@\(service)' type='groupchat' id='\(id)'><body>\(body)</body></message>")
    }

    static func message(_ client: TestClient, from: String, body: String) async throws -> XMLElement {
        try await client.expect("message '\(body)' from \(from)") { $0.name == "message" && $0[attribute: "from"] == from && $0.child("body")?.text == body }
    }

    static func presence(_ client: TestClient, from: String, type: String? = nil) async throws -> XMLElement {
        try await client.expect("presence from \(from)") { $0.name == "presence" && $0[attribute: "from"] == from && $0[attribute: "type"] == type }
    }
}
