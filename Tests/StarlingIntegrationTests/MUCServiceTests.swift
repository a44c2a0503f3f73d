import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// The MUC service across restarts and under the limits an operator sets, each test on a server of its
/// own (on SQLite, and again on PostgreSQL when scripts/test reruns the suite).
final class MUCServiceTests: XCTestCase {
    static let users = (1...6).map { ("s\($0)", "pw\($0)") }

    private func login(_ server: ServerProcess, _ number: Int, resource: String = "r") async throws -> TestClient {
        try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct,
                                   username: "s\(number)", password: "pw\(number)", resource: resource)
    }

    private static func config(_ muc: String) -> String {
        """
        modules:
          disco: {}
          ping: {}
          roster: {}
          presence: {}
          muc: \(muc)
        """
    }

    func testPersistentRoomsSurviveARestartAndOccupantsHearTheShutdown() async throws {
        var server = try ServerProcess(extraConfig: Self.config("{}"), users: Self.users)
        let owner = try await login(server, 1)
        let guest = try await login(server, 2)
        try await MUC.createInstantRoom(owner, "keep", nick: "Owner")
        _ = try await MUC.configure(owner, "keep", ["persistentroom": ["1"], "roomname": ["Kept"], "moderatedroom": ["1"], "whois": ["anyone"]])
        _ = try await MUC.admin(owner, "keep", "<item affiliation='member' jid='s3@localhost' nick='Three'/>")
        _ = try await MUC.admin(owner, "keep", "<item affiliation='outcast' jid='s4@localhost'><reason>no</reason></item>")
        _ = try await MUC.admin(owner, "keep", "<item affiliation='admin' jid='s5@localhost'/>")
        owner.send("<message to='keep@\(MUC.service)' type='groupchat'><subject>Kept subject</subject></message>")
        _ = try await owner.expect("the subject reflected") { $0.child("subject")?.text == "Kept subject" }
        let joined = try await MUC.join(guest, "keep", nick: "Guest")
        let occupantID = joined.own.child("occupant-id", namespace: "urn:xmpp:occupant-id:0")?[attribute: "id"]
        XCTAssertNotNil(occupantID)
        XCTAssertEqual(joined.subject.child("subject")?.text, "Kept subject")
        // A temporary room, which must not come back.
        try await MUC.createInstantRoom(guest, "fleeting", nick: "Guest")

        // SIGTERM: occupants are told the service is going away (332) before their streams close.
        server.process.terminate()
        let shutdown = try await guest.expect("shutdown presence") {
            $0.name == "presence" && $0[attribute: "from"] == "keep@\(MUC.service)/Guest" && $0[attribute: "type"] == "unavailable"
        }
        XCTAssertEqual(MUC.statuses(shutdown), [110, 332])
        let streamError = try await guest.expectStreamError()
        XCTAssertEqual(streamError, "system-shutdown")
        XCTAssertEqual(server.stop(), 0)

        server = try ServerProcess(restarting: server)
        defer { XCTAssertEqual(server.stop(), 0) }
        let owner2 = try await login(server, 1)
        let guest2 = try await login(server, 2)
        let banned = try await login(server, 4)
        // Configuration, subject and affiliations came back.
        let info = try await guest2.iq("<iq type='get' to='keep@\(MUC.service)' id='i'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "i")
        XCTAssertEqual(info.child("query")?.child("identity")?[attribute: "name"], "Kept")
        let features = Set(info.child("query")?.elements.compactMap { $0[attribute: "var"] } ?? [])
        XCTAssertTrue(features.isSuperset(of: ["muc_persistent", "muc_moderated", "muc_nonanonymous"]), "\(features)")
        let rejoined = try await MUC.join(guest2, "keep", nick: "Guest")
        XCTAssertEqual(rejoined.subject.child("subject")?.text, "Kept subject")
        XCTAssertEqual(MUC.item(rejoined.own)?[attribute: "role"], "visitor", "still moderated")
        XCTAssertEqual(rejoined.own.child("occupant-id", namespace: "urn:xmpp:occupant-id:0")?[attribute: "id"], occupantID, "occupant ids are stable")
        let stillBanned = try await MUC.refusedJoin(banned, "keep", nick: "Four")
        XCTAssertEqual(stillBanned, "forbidden")
        let members = try await owner2.iq("<iq type='get' to='keep@\(MUC.service)' id='m'><query xmlns='\(MUC.admin)'><item affiliation='member'/></query></iq>", id: "m")
        XCTAssertEqual(members.child("query")?.child("item")?[attribute: "jid"], "s3@localhost")
        XCTAssertEqual(members.child("query")?.child("item")?[attribute: "nick"], "Three")
        let admins = try await owner2.iq("<iq type='get' to='keep@\(MUC.service)' id='a'><query xmlns='\(MUC.admin)'><item affiliation='admin'/></query></iq>", id: "a")
        XCTAssertEqual(admins.child("query")?.child("item")?[attribute: "jid"], "s5@localhost")
        let owned = try await MUC.join(owner2, "keep", nick: "Owner")
        XCTAssertEqual(MUC.item(owned.own)?[attribute: "affiliation"], "owner")
        let fleeting = try await guest2.iq("<iq type='get' to='fleeting@\(MUC.service)' id='f'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "f")
        XCTAssertEqual(MUC.errorCondition(fleeting), "item-not-found")

        // A persistent room stays with nobody in it; made temporary and left, it is gone for good.
        guest2.send("<presence to='keep@\(MUC.service)/Guest' type='unavailable'/>")
        owner2.send("<presence to='keep@\(MUC.service)/Owner' type='unavailable'/>")
        _ = try await MUC.presence(owner2, from: "keep@\(MUC.service)/Owner", type: "unavailable")
        let empty = try await guest2.iq("<iq type='get' to='keep@\(MUC.service)' id='e'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "e")
        XCTAssertEqual(empty[attribute: "type"], "result")
        let temporary = try await MUC.configure(owner2, "keep", ["persistentroom": ["0"]])
        XCTAssertEqual(temporary[attribute: "type"], "result")
        let gone = try await guest2.iq("<iq type='get' to='keep@\(MUC.service)' id='g'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "g")
        XCTAssertEqual(MUC.errorCondition(gone), "item-not-found")
    }

    func testReloadingTheConfigKeepsTheRoomsAndDisablingTheModuleClosesThem() async throws {
        let server = try ServerProcess(extraConfig: Self.config("{ max_nick_length: 20 }"), users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let owner = try await login(server, 1)
        let guest = try await login(server, 2)
        try await MUC.createInstantRoom(owner, "live", nick: "Owner")
        _ = try await MUC.join(guest, "live", nick: "Guest")
        let original = try String(contentsOfFile: server.configPath, encoding: .utf8)
        func reload(_ muc: String?, dryRun: Bool = false) throws -> String {
            let changed = original.replacingOccurrences(of: "  muc: { max_nick_length: 20 }", with: muc.map { "  muc: \($0)" } ?? "")
            XCTAssertNotEqual(changed, original)
            try changed.write(toFile: server.configPath, atomically: true, encoding: .utf8)
            let (status, output) = try server.ctl(["reload-config"] + (dryRun ? ["--dry-run"] : []))
            XCTAssertEqual(status, 0, output)
            return output
        }

        // A dry run builds the new module but changes nothing.
        let dryRun = try reload("{ max_nick_length: 4 }", dryRun: true)
        XCTAssertTrue(dryRun.contains("would apply: localhost: muc restarted with new options"), dryRun)
        _ = try await MUC.join(try await login(server, 3), "live", nick: "Three33")

        // New options: the room and its occupants carry on, and the new limit holds.
        let applied = try reload("{ max_nick_length: 4 }")
        XCTAssertTrue(applied.contains("applied: localhost: muc restarted with new options"), applied)
        MUC.groupchat(guest, "live", "still here")
        _ = try await MUC.message(owner, from: "live@\(MUC.service)/Guest", body: "still here")
        let longNick = try await MUC.refusedJoin(try await login(server, 4), "live", nick: "Four44")
        XCTAssertEqual(longNick, "not-acceptable")
        _ = try await MUC.join(try await login(server, 5), "live", nick: "Five")

        // Disabled: occupants hear that the service is going away (332), and it no longer answers.
        let disabled = try reload(nil)
        XCTAssertTrue(disabled.contains("applied: localhost: muc disabled"), disabled)
        let closed = try await MUC.presence(guest, from: "live@\(MUC.service)/Guest", type: "unavailable")
        XCTAssertEqual(MUC.statuses(closed), [110, 332])
        let unserved = try await guest.iq("<iq type='get' to='\(MUC.service)' id='u'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "u")
        XCTAssertEqual(unserved[attribute: "type"], "error")

        // Enabled again: a fresh service, without the temporary room.
        _ = try reload("{}")
        let gone = try await guest.iq("<iq type='get' to='live@\(MUC.service)' id='g'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "g")
        XCTAssertEqual(MUC.errorCondition(gone), "item-not-found")
        try await MUC.createInstantRoom(owner, "again", nick: "Owner")
    }

    func testOperatorLimits() async throws {
        let server = try ServerProcess(extraConfig: Self.config("""
        { max_rooms: 2, max_rooms_per_session: 2, max_occupants: 3, message_rate: 0.01, message_burst: 3, max_nick_length: 8,
               max_subject_length: 10, room_creation: listed, room_creators: [s1@localhost, example.test], history_size: 2 }
        """), users: Self.users)
        defer { XCTAssertEqual(server.stop(), 0) }
        let creator = try await login(server, 1)
        let other = try await login(server, 2)
        // Only listed users and domains create rooms.
        let refused = try await MUC.refusedJoin(other, "mine", nick: "Other")
        XCTAssertEqual(refused, "not-allowed")
        try await MUC.createInstantRoom(creator, "one", nick: "Creator")
        try await MUC.createInstantRoom(creator, "two", nick: "Creator")
        // Two rooms at most on the service, and per session.
        let third = try await MUC.refusedJoin(creator, "three", nick: "Creator")
        XCTAssertEqual(third, "resource-constraint")
        _ = try await MUC.join(other, "one", nick: "Other")
        _ = try await MUC.join(other, "two", nick: "Other")
        // Nicknames and subjects have a length limit.
        let longNick = try await MUC.refusedJoin(try await login(server, 3), "one", nick: "Nickname9")
        XCTAssertEqual(longNick, "not-acceptable")
        creator.send("<message to='one@\(MUC.service)' type='groupchat' id='subj'><subject>far too long a subject</subject></message>")
        let subject = try await creator.expect("subject refusal") { $0[attribute: "id"] == "subj" }
        XCTAssertEqual(MUC.errorCondition(subject), "not-acceptable")
        // A flood from one occupant is refused after its burst; the room and the others carry on.
        for index in 1...5 { MUC.groupchat(other, "one", "flood \(index)", id: "f\(index)") }
        let limited = try await other.expect("rate limit") { $0[attribute: "type"] == "error" && ($0[attribute: "id"] ?? "").hasPrefix("f") }
        XCTAssertEqual(MUC.errorCondition(limited), "resource-constraint")
        MUC.groupchat(creator, "one", "the room is fine")
        _ = try await MUC.message(other, from: "one@\(MUC.service)/Creator", body: "the room is fine")
        // The room is full at three occupants.
        _ = try await MUC.join(try await login(server, 4), "one", nick: "Four")
        let full = try await MUC.refusedJoin(try await login(server, 5), "one", nick: "Five")
        XCTAssertEqual(full, "service-unavailable")
    }
}
