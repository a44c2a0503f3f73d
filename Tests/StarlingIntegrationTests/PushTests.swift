import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// XEP-0357 on the real server, with an app server played by a client session that takes the publishes:
/// notifications while the phone is inactive (CSI), detached (stream management), or gone while another
/// device is online, each a summary (count and sender, no body) with the client's publish options; an
/// error from the app server disables the registration; `disable` stops it.
final class PushTests: XCTestCase {
    static let appServer = "appserver@localhost/svc"

    func enablePush(_ client: TestClient, node: String, secret: String = "s3cr3t") async throws {
        let reply = try await client.iq("""
            <iq type='set' id='push-\(node)'><enable xmlns='urn:xmpp:push:0' jid='\(Self.appServer)' node='\(node)'>\
            <x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>\
            <field var='secret'><value>\(secret)</value></field></x></enable></iq>
            """, id: "push-\(node)")
        XCTAssertEqual(reply[attribute: "type"], "result", reply.serialized())
    }

    /// The next publish the app server receives (answered with `answer`), as (node, summary fields, secret).
    func nextPublish(_ appServer: TestClient, answer: String = "result") async throws -> (node: String, fields: [String: String], secret: String?) {
        let iq = try await appServer.expect("a push notification") { $0.name == "iq" && $0[attribute: "type"] == "set" }
        let pubsub = try XCTUnwrap(iq.child("pubsub", namespace: "http://jabber.org/protocol/pubsub"), iq.serialized())
        let publish = try XCTUnwrap(pubsub.child("publish"), iq.serialized())
        let form = try XCTUnwrap(publish.child("item")?.child("notification", namespace: "urn:xmpp:push:0").flatMap { DataForm.first(in: $0) }, iq.serialized())
        XCTAssertEqual(form.formType, "urn:xmpp:push:summary")
        var fields: [String: String] = [:]
        for field in form.fields { if let name = field.variable, name != "FORM_TYPE" { fields[name] = field.value } }
        let secret = pubsub.child("publish-options").flatMap { DataForm.first(in: $0) }?["secret"]?.value
        XCTAssertEqual(iq[attribute: "from"].flatMap { JID($0)?.resourcepart }, nil, "published from the account's bare JID")
        var reply = XMLElement(name: "iq", namespace: Namespace.client, attributes: ["type": answer, "id": iq[attribute: "id"] ?? "", "to": iq[attribute: "from"] ?? ""])
        if answer == "error" {
            var error = XMLElement(name: "error", namespace: Namespace.client, attributes: ["type": "cancel"])
            error.append(XMLElement(name: "item-not-found", namespace: "urn:ietf:params:xml:ns:xmpp-stanzas"))
            reply.append(error)
        }
        appServer.send(reply)
        return (publish[attribute: "node"] ?? "", fields, secret)
    }

    /// A round trip on `client`'s stream: the server has handled everything the client sent before.
    func sync(_ client: TestClient) async throws {
        let id = "sync-\(UUID().uuidString.prefix(8))"
        _ = try await client.iq("<iq type='get' id='\(id)' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", id: id)
    }

    func testNotificationsWhileInactiveDetachedOrGone() async throws {
        let server = try ServerProcess(users: [("phone", "pw"), ("desk", "pw"), ("appserver", "pw"), ("multi", "pw")])
        defer { XCTAssertEqual(server.stop(), 0) }
        func login(_ user: String, _ resource: String) async throws -> TestClient {
            try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: user, password: "pw", resource: resource)
        }
        let appServer = try await login("appserver", "svc")
        let desk = try await login("desk", "d")
        let phone = try await login("phone", "p")
        phone.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        let enabled = try await phone.expect("stream management enabled") { $0.name == "enabled" }
        let resumptionID = try XCTUnwrap(enabled[attribute: "id"])
        try await enablePush(phone, node: "node-1")

        // Online and active: the message is delivered, nobody is woken (the count below starts at 1).
        desk.send("<message to='phone@localhost' type='chat'><body>while active</body></message>")
        _ = try await phone.expect("the message") { $0.child("body")?.text == "while active" }

        // Inactive (CSI): the message still goes to the session, and the app server hears of it.
        phone.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        try await sync(phone)
        desk.send("<message to='phone@localhost' type='chat'><body>while inactive</body></message>")
        var push = try await nextPublish(appServer)
        XCTAssertEqual(push.node, "node-1")
        XCTAssertEqual(push.fields, ["message-count": "1", "last-message-sender": "desk@localhost"], "a summary without the body")
        XCTAssertEqual(push.secret, "s3cr3t", "the client's publish options go with every notification")
        // A chat state alone is no reason to wake a phone; the next message counts 2.
        desk.send("<message to='phone@localhost' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
        desk.send("<message to='phone@localhost' type='chat'><body>again</body></message>")
        push = try await nextPublish(appServer)
        XCTAssertEqual(push.fields["message-count"], "2")
        phone.send("<active xmlns='urn:xmpp:csi:0'/>")
        try await sync(phone)
        _ = try await phone.expect("the held message") { $0.child("body")?.text == "again" }
        // Active again resets the count.
        phone.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        try await sync(phone)
        desk.send("<message to='phone@localhost' type='chat'><body>later</body></message>")
        push = try await nextPublish(appServer)
        XCTAssertEqual(push.fields["message-count"], "1")
        phone.send("<active xmlns='urn:xmpp:csi:0'/>")
        try await sync(phone)

        // A second registration, then `disable` of the first: only the second is notified (the first would
        // come first, in registration order).
        try await enablePush(phone, node: "node-1b")
        let disabled = try await phone.iq("<iq type='set' id='off'><disable xmlns='urn:xmpp:push:0' jid='\(Self.appServer)' node='node-1'/></iq>", id: "off")
        XCTAssertEqual(disabled[attribute: "type"], "result", disabled.serialized())
        phone.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        try await sync(phone)
        desk.send("<message to='phone@localhost' type='chat'><body>after disable</body></message>")
        push = try await nextPublish(appServer)
        XCTAssertEqual(push.node, "node-1b", "a disabled registration is not notified")
        phone.send("<active xmlns='urn:xmpp:csi:0'/>")
        try await sync(phone)
        let foreign = try await phone.iq("<iq type='set' id='theirs' to='desk@localhost'><enable xmlns='urn:xmpp:push:0' jid='\(Self.appServer)' node='x'/></iq>", id: "theirs")
        XCTAssertEqual(foreign.child("error")?.elements.first?.name, "forbidden", "push is enabled for one's own account only")
        let nameless = try await phone.iq("<iq type='set' id='nameless'><enable xmlns='urn:xmpp:push:0' node='x'/></iq>", id: "nameless")
        XCTAssertEqual(nameless.child("error")?.elements.first?.name, "bad-request")

        // Gone while another device of the account is online: that device gets it, the gone one is woken.
        // The laptop sees each phone's session end (its unavailable presence) before the next message goes.
        let laptop = try await login("multi", "laptop")
        func enableAndLeave(_ resource: String, node: String) async throws {
            let mobile = try await login("multi", resource)
            try await enablePush(mobile, node: node)
            await mobile.close()
            _ = try await laptop.expect("\(resource) gone") { $0.name == "presence" && $0[attribute: "type"] == "unavailable" && $0[attribute: "from"] == "multi@localhost/\(resource)" }
        }
        try await enableAndLeave("mobile", node: "node-m")
        desk.send("<message to='multi@localhost' type='chat'><body>to the account</body></message>")
        _ = try await laptop.expect("the message at the laptop") { $0.child("body")?.text == "to the account" }
        push = try await nextPublish(appServer)
        XCTAssertEqual(push.node, "node-m")
        XCTAssertEqual(push.fields["message-count"], "1")

        // The app server refuses node-m: it is disabled, so the next message wakes only node-m2.
        try await enableAndLeave("mobile2", node: "node-m2")
        desk.send("<message to='multi@localhost' type='chat'><body>one</body></message>")
        var nodes: [String] = []
        for _ in 0..<2 {
            let next = try await nextPublish(appServer, answer: "error")
            nodes.append(next.node)
        }
        XCTAssertEqual(Set(nodes), ["node-m", "node-m2"])
        // The server has read both errors once it answers what the app server sent after them.
        try await sync(appServer)
        try await enableAndLeave("mobile3", node: "node-m3")
        desk.send("<message to='multi@localhost' type='chat'><body>two</body></message>")
        // Notifications for one message go out in registration order: node-m and node-m2 would come first.
        push = try await nextPublish(appServer)
        XCTAssertEqual(push.node, "node-m3", "disabled registrations are not notified")
        await laptop.close()

        // Detached by stream management (the network went away) while inactive: woken for what comes meanwhile.
        phone.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        try await sync(phone)
        await phone.drop()
        desk.send("<message to='phone@localhost' type='chat'><body>while detached</body></message>")
        // The messages the phone never acknowledged count too (it may not have seen them).
        push = try await nextPublish(appServer)
        XCTAssertEqual(push.node, "node-1b")
        XCTAssertEqual(push.fields["last-message-sender"], "desk@localhost")

        // Resumed, the stream is active (XEP-0352 §5.2): what reaches it wakes nobody until it says inactive
        // again. The app server's own message would be the next notification if it did.
        let back = try await TestClient.connect(port: server.directTLSPort, domain: "localhost", tls: .direct)
        _ = try await back.openStream()
        try await back.authenticate(username: "phone", password: "pw", mechanism: "SCRAM-SHA-256")
        back.send("<resume xmlns='urn:xmpp:sm:3' previd='\(resumptionID)' h='0'/>")
        let resumed = try await back.expect("resumed") { $0.namespace == "urn:xmpp:sm:3" && ($0.name == "resumed" || $0.name == "failed") }
        XCTAssertEqual(resumed.name, "resumed", resumed.serialized())
        appServer.send("<message to='phone@localhost/p' type='chat'><body>after resuming</body></message>")
        _ = try await back.expect("the message after resuming") { $0.child("body")?.text == "after resuming" }
        back.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        try await sync(back)
        let other = try await login("multi", "other")
        other.send("<message to='phone@localhost/p' type='chat'><body>inactive again</body></message>")
        // Notifications still owed for the detached time come first; none may be for the app server's message.
        var senders: [String] = []
        while senders.last != "multi@localhost" { senders.append(try await nextPublish(appServer).fields["last-message-sender"] ?? "") }
        XCTAssertFalse(senders.contains("appserver@localhost"), "a resumed stream was taken for inactive: \(senders)")
        await other.close()
        await back.close()
        await desk.close()
        await appServer.close()
    }
}
