import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// XEP-0388 SASL2 with XEP-0386 Bind2 on the real server: one round trip from stream features to a bound
/// resource, with SCRAM (and channel binding) or PLAIN, next to clients that log in the RFC 6120 way.
final class SASL2Tests: XCTestCase {
    func testSASL2WithBind2LogsInAndChatsWithAClassicClient() async throws {
        let server = try ServerProcess(users: [("phone", "pw1"), ("desk", "pw2")])
        defer { XCTAssertEqual(server.stop(), 0) }
        let desk = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "desk", password: "pw2", resource: "r")

        for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "PLAIN"] {
            let phone = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
            let features = try await phone.openStream()
            let offered = features.child("authentication", namespace: "urn:xmpp:sasl:2")
            XCTAssertTrue(offered?.elements.contains { $0.name == "mechanism" && $0.text == mechanism } ?? false, features.serialized())
            XCTAssertNotNil(offered?.child("inline")?.child("bind", namespace: "urn:xmpp:bind:0"), features.serialized())
            let success = try await phone.authenticateSASL2(username: "phone", password: "pw1", mechanism: mechanism, bindTag: "Conversations")
            let jid = try XCTUnwrap(phone.boundJID, success.serialized())
            XCTAssertEqual(jid.bare.description, "phone@localhost")
            XCTAssertTrue(jid.resourcepart?.hasPrefix("Conversations.") ?? false, jid.description)
            // Bound already: stanzas flow at once, both ways.
            phone.send("<presence/>")
            phone.send("<message to='desk@localhost/r' type='chat'><body>via \(mechanism)</body></message>")
            let received = try await desk.expect("the phone's message") { $0.name == "message" && $0.child("body")?.text == "via \(mechanism)" }
            XCTAssertEqual(received[attribute: "from"], jid.description)
            desk.send("<message to='\(jid)' type='chat'><body>back</body></message>")
            _ = try await phone.expect("the answer") { $0.name == "message" && $0.child("body")?.text == "back" }
            await phone.close()
        }

        let wrong = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        _ = try await wrong.openStream()
        do {
            try await wrong.authenticateSASL2(username: "phone", password: "nope", mechanism: "SCRAM-SHA-256", bindTag: "x")
            XCTFail("a wrong password logged in")
        } catch TestClientError.authenticationFailed(let condition) {
            XCTAssertEqual(condition, "not-authorized")
        }
        await wrong.close()
        await desk.close()
    }

    func testBind2EnablesStreamManagementAndCarbonsInline() async throws {
        let server = try ServerProcess(users: [("phone", "pw1"), ("desk", "pw2")])
        defer { XCTAssertEqual(server.stop(), 0) }
        let desk = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "desk", password: "pw2", resource: "r")
        let phone = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        let features = try await phone.openStream()
        let inline = features.child("authentication", namespace: "urn:xmpp:sasl:2")?.child("inline")?.child("bind", namespace: "urn:xmpp:bind:0")?
            .child("inline", namespace: "urn:xmpp:bind:0")?.elements.compactMap { $0[attribute: "var"] } ?? []
        XCTAssertEqual(Set(inline), ["urn:xmpp:sm:3", "urn:xmpp:carbons:2", "urn:xmpp:csi:0"], features.serialized())
        // Stream management with resumption and carbons in the same round trip; an unadvertised element is ignored.
        let success = try await phone.authenticateSASL2(username: "phone", password: "pw1", mechanism: "SCRAM-SHA-256", bindTag: "Conversations",
                                                        bindInline: "<enable xmlns='urn:xmpp:sm:3' resume='true'/><enable xmlns='urn:xmpp:carbons:2'/><unknown xmlns='urn:example:nothing'/>")
        let bound = try XCTUnwrap(success.child("bound", namespace: "urn:xmpp:bind:0"), success.serialized())
        let enabled = try XCTUnwrap(bound.child("enabled", namespace: "urn:xmpp:sm:3"), success.serialized())
        XCTAssertEqual(enabled[attribute: "resume"], "true")
        XCTAssertNotNil(enabled[attribute: "id"])
        let phoneJID = try XCTUnwrap(phone.boundJID)
        // Stream management counts from here: nothing handled yet.
        phone.send("<presence/>")
        phone.send("<r xmlns='urn:xmpp:sm:3'/>")
        let ack = try await phone.expect("an acknowledgement") { $0.name == "a" && $0.namespace == "urn:xmpp:sm:3" }
        XCTAssertEqual(ack[attribute: "h"], "1")
        // Carbons: what the account sends from another resource comes to the phone as a sent carbon.
        let laptop = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "phone", password: "pw1", resource: "laptop")
        laptop.send("<message to='desk@localhost/r' type='chat'><body>from the laptop</body></message>")
        _ = try await desk.expect("the laptop's message") { $0.name == "message" && $0.child("body")?.text == "from the laptop" }
        let carbon = try await phone.expect("a sent carbon at the phone") { $0.name == "message" && $0.child("sent", namespace: "urn:xmpp:carbons:2") != nil }
        XCTAssertEqual(carbon[attribute: "to"], phoneJID.description)
        await laptop.close()
        await phone.close()
        await desk.close()
    }
}
