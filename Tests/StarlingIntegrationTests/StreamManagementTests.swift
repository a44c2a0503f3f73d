import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// XEP-0198 on the real server: acknowledgements both ways, resumption after a dropped connection with
/// what was not acknowledged sent again, refusals, and the timeout handing unacknowledged messages to
/// offline storage.
final class StreamManagementTests: XCTestCase {
    static let users = (1...12).map { ("sm\($0)", "pw\($0)") }
    static let namespace = "urn:xmpp:sm:3"
    nonisolated(unsafe) static var server: ServerProcess!
    nonisolated(unsafe) static var startFailure: (any Error)?

    override class func setUp() {
        super.setUp()
        do { server = try ServerProcess(extraConfig: """
        modules:
          disco: {}
          ping: {}
          roster: {}
          presence: {}
          offline: {}
          csi: {}
          stream_management: { resume_timeout: 2 }
        """, users: users) } catch {
            startFailure = error
        }
    }

    override func setUpWithError() throws {
        if let failure = Self.startFailure { throw failure }
    }

    override class func tearDown() {
        startFailure = nil
        XCTAssertEqual(server?.stop() ?? 0, 0)
        server = nil
        super.tearDown()
    }

    private func login(_ number: Int, resource: String) async throws -> TestClient {
        try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "sm\(number)", password: "pw\(number)",
                                   resource: resource)
    }

    /// A connection that has authenticated as `sm<number>` and bound nothing yet.
    private func authenticated(_ number: Int) async throws -> TestClient {
        let client = try await TestClient.connect(port: Self.server.directTLSPort, domain: "localhost", tls: .direct)
        _ = try await client.openStream()
        try await client.authenticate(username: "sm\(number)", password: "pw\(number)", mechanism: "SCRAM-SHA-256")
        return client
    }

    private func nonza(_ client: TestClient, _ names: Set<String>) async throws -> XMLElement {
        try await client.expect("one of \(names)") { $0.namespace == Self.namespace && names.contains($0.name) }
    }

    /// Enables stream management; returns the resumption id when resumable.
    private func enable(_ client: TestClient, resume: Bool) async throws -> String? {
        client.send("<enable xmlns='\(Self.namespace)'\(resume ? " resume='true'" : "")/>")
        let enabled = try await nonza(client, ["enabled", "failed"])
        XCTAssertEqual(enabled.name, "enabled", enabled.serialized())
        if resume { XCTAssertEqual(enabled[attribute: "resume"], "true") }
        return enabled[attribute: "id"]
    }

    private func chat(_ from: TestClient, to: String, _ body: String) {
        from.send("<message to='\(to)' type='chat'><body>\(body)</body></message>")
    }

    private func failedCondition(_ element: XMLElement) -> String? {
        element.name == "failed" ? element.elements.first?.name : nil
    }

    func testAcknowledgementsCountStanzasBothWays() async throws {
        // Not before a resource is bound.
        let early = try await authenticated(1)
        early.send("<enable xmlns='\(Self.namespace)'/>")
        let answer1 = try await nonza(early, ["enabled", "failed"])
        XCTAssertEqual(failedCondition(answer1), "unexpected-request")
        await early.close()

        let alice = try await login(1, resource: "a")
        let bob = try await login(2, resource: "b")
        let plainID = try await enable(alice, resume: false)
        XCTAssertNil(plainID, "no id without resumption")
        alice.send("<enable xmlns='\(Self.namespace)'/>")
        let answer2 = try await nonza(alice, ["enabled", "failed"])
        XCTAssertEqual(failedCondition(answer2), "unexpected-request", "enabling twice")

        // Alice sends two stanzas, then asks: the server handled two.
        chat(alice, to: "sm2@localhost/b", "one")
        chat(alice, to: "sm2@localhost/b", "two")
        alice.send("<r xmlns='\(Self.namespace)'/>")
        let handled = try await nonza(alice, ["a"])
        XCTAssertEqual(handled[attribute: "h"], "2")
        _ = try await bob.expect("two") { $0.child("body")?.text == "two" }

        // Bob sends three; the server asks Alice, who acknowledges exactly what she received.
        for body in ["x", "y", "z"] { chat(bob, to: "sm1@localhost/a", body) }
        var received = 0
        var sawRequest = false
        while received < 3 || !sawRequest {
            let event = try await alice.next()
            guard case .element(let element) = event else { continue }
            if element.namespace == Self.namespace, element.name == "r" { sawRequest = true; continue }
            if ["message", "presence", "iq"].contains(element.name) { received += 1 }
        }
        alice.send("<a xmlns='\(Self.namespace)' h='\(received)'/>")
        let ping = try await alice.iq("<iq type='get' id='still' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", id: "still")
        XCTAssertEqual(ping[attribute: "type"], "result", "the stream carries on after a correct acknowledgement")

        // Acknowledging more than was sent ends the stream.
        alice.send("<a xmlns='\(Self.namespace)' h='4000000'/>")
        let condition = try await alice.expectStreamError()
        XCTAssertEqual(condition, "undefined-condition")
        await bob.close()
    }

    func testResumptionSendsAgainWhatWasNotAcknowledgedAndWhatCameMeanwhile() async throws {
        let phone = try await login(3, resource: "phone")
        let bob = try await login(4, resource: "b")
        let resumable = try await enable(phone, resume: true)
        let id = try XCTUnwrap(resumable)
        chat(bob, to: "sm3@localhost/phone", "before the tunnel")
        _ = try await phone.expect("the first message") { $0.child("body")?.text == "before the tunnel" }
        await phone.drop()
        chat(bob, to: "sm3@localhost/phone", "while in the tunnel")

        let back = try await authenticated(3)
        back.send("<resume xmlns='\(Self.namespace)' previd='\(id)' h='0'/>")
        let resumed = try await nonza(back, ["resumed", "failed"])
        XCTAssertEqual(resumed.name, "resumed", resumed.serialized())
        XCTAssertEqual(resumed[attribute: "previd"], id)
        let first = try await back.expect("a message") { $0.name == "message" }
        let second = try await back.expect("a message") { $0.name == "message" }
        XCTAssertEqual([first, second].map { $0.child("body")?.text }, ["before the tunnel", "while in the tunnel"])
        XCTAssertEqual(first[attribute: "to"], "sm3@localhost/phone", "the same resource, resumed")
        _ = try await nonza(back, ["r"])  // the server asks for an acknowledgement of what it sent again
        chat(bob, to: "sm3@localhost/phone", "after")
        _ = try await back.expect("a message after resuming") { $0.child("body")?.text == "after" }
        let ping = try await back.iq("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", id: "p")
        XCTAssertEqual(ping[attribute: "type"], "result")
        // The id was used up.
        let again = try await authenticated(3)
        again.send("<resume xmlns='\(Self.namespace)' previd='\(id)' h='0'/>")
        let answer3 = try await nonza(again, ["resumed", "failed"])
        XCTAssertEqual(failedCondition(answer3), "item-not-found")
        for client in [back, again, bob] { await client.close() }
    }

    /// A resumed stream starts active whatever the old one had said (XEP-0352 §5.2): presence the server
    /// held for the inactive client comes once it is resumed, and new presence at once.
    func testAResumedStreamIsActive() async throws {
        let phone = try await login(11, resource: "phone")
        let friend = try await login(12, resource: "f")
        try await befriend(phone, "sm11@localhost", friend, "sm12@localhost")
        let enabled = try await enable(phone, resume: true)
        let id = try XCTUnwrap(enabled)
        phone.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        _ = try await phone.iq("<iq type='get' id='inactive' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", id: "inactive")
        friend.send("<presence><status>while inactive</status></presence>")
        await phone.drop()

        let back = try await authenticated(11)
        back.send("<resume xmlns='\(Self.namespace)' previd='\(id)' h='0'/>")
        let resumed = try await nonza(back, ["resumed", "failed"])
        XCTAssertEqual(resumed.name, "resumed", resumed.serialized())
        friend.send("<presence><status>after resuming</status></presence>")
        _ = try await back.expect("presence sent after resuming") { $0.name == "presence" && $0.child("status")?.text == "after resuming" }
        for client in [back, friend] { await client.close() }
    }

    func testUnknownAndOtherAccountsIDsAreRefused() async throws {
        let stranger = try await authenticated(5)
        stranger.send("<resume xmlns='\(Self.namespace)' previd='no-such-id' h='0'/>")
        let answer4 = try await nonza(stranger, ["resumed", "failed"])
        XCTAssertEqual(failedCondition(answer4), "item-not-found")
        _ = try await stranger.bind(resource: "bound-after-all")

        let owner = try await login(6, resource: "o")
        let ownerID = try await enable(owner, resume: true)
        let id = try XCTUnwrap(ownerID)
        await owner.drop()
        let thief = try await authenticated(7)
        thief.send("<resume xmlns='\(Self.namespace)' previd='\(id)' h='0'/>")
        let answer5 = try await nonza(thief, ["resumed", "failed"])
        XCTAssertEqual(failedCondition(answer5), "item-not-found", "another account's session")
        let rightful = try await authenticated(6)
        rightful.send("<resume xmlns='\(Self.namespace)' previd='\(id)' h='0'/>")
        let rightfulAnswer = try await nonza(rightful, ["resumed", "failed"])
        XCTAssertEqual(rightfulAnswer.name, "resumed", "the failed attempt did not use the id up")
        for client in [stranger, thief, rightful] { await client.close() }
    }

    func testUnresumedSessionsEndAndTheirMessagesAreKeptOffline() async throws {
        let phone = try await login(8, resource: "phone")
        let bob = try await login(9, resource: "b")
        try await befriend(phone, "sm8@localhost", bob, "sm9@localhost")
        _ = try await enable(phone, resume: true)
        chat(bob, to: "sm8@localhost/phone", "never acknowledged")
        _ = try await phone.expect("the message") { $0.child("body")?.text == "never acknowledged" }
        await phone.drop()
        // After resume_timeout the session ends: contacts see it go.
        _ = try await bob.expect("the phone going away", timeout: 30) {
            $0.name == "presence" && $0[attribute: "type"] == "unavailable" && $0[attribute: "from"] == "sm8@localhost/phone"
        }
        let later = try await login(8, resource: "later")
        let kept = try await later.expect("the message, from offline storage") { $0.child("body")?.text == "never acknowledged" }
        XCTAssertNotNil(kept.child("delay", namespace: "urn:xmpp:delay"), kept.serialized())
        for client in [later, bob] { await client.close() }
    }

    func testSlixmppResumesAfterItsConnectionIsCut() async throws {
        let (status, output) = try ServerProcess.slixmpp([
            "sm", "--port", "\(Self.server.directTLSPort)", "--tls", "direct",
            "--jid-a", "sm10@localhost", "--password-a", "pw10", "--jid-b", "sm2@localhost", "--password-b", "pw2",
        ])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("OK"), output)
    }
}
