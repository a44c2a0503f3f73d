import Crypto
import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest

/// Personal eventing (XEP-0163) and the PubSub service (XEP-0060) on the real server, as clients use
/// them: entity capabilities with `+notify`, notifications to contacts who see the publisher's presence,
/// the newest item when a resource comes online, access models, publish-options preconditions, quotas;
/// a service's nodes with subscriptions, affiliations and approval of pending subscribers.
final class PubSubTests: XCTestCase {
    static let users = (1...16).map { ("p\($0)", "pw\($0)") }
    static let service = "pubsub.localhost"
    nonisolated(unsafe) static var server: ServerProcess!
    nonisolated(unsafe) static var startFailure: (any Error)?

    static let nick = "http://jabber.org/protocol/nick"
    static let avatarMetadata = "urn:xmpp:avatar:metadata"
    static let bookmarks = "urn:xmpp:bookmarks:1"
    static let omemoDevices = "eu.siacs.conversations.axolotl.devicelist"
    static let pubsub = "http://jabber.org/protocol/pubsub"
    static let event = "http://jabber.org/protocol/pubsub#event"
    static let errors = "http://jabber.org/protocol/pubsub#errors"

    override class func setUp() {
        super.setUp()
        do { server = try ServerProcess(extraConfig: """
        modules:
          disco: {}
          roster: {}
          presence: {}
          vcard: {}
          ping: {}
          pep: { max_nodes: 4, max_item_size: 4096 }
          pubsub: {}
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

    // MARK: Helpers

    private func login(_ number: Int, resource: String? = nil, notify: [String]? = nil) async throws -> TestClient {
        try await loginAnnouncing(number, resource: resource, notify: notify).client
    }

    private func loginAnnouncing(_ number: Int, resource: String? = nil, notify: [String]? = nil) async throws -> (client: TestClient, ver: String?) {
        let client = try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct,
                                                username: "p\(number)", password: "pw\(number)", resource: resource, presence: notify == nil)
        guard let notify else { return (client, nil) }
        return (client, try await announce(client, interests: notify))
    }

    /// Sends available presence with XEP-0115 capabilities saying `+notify` for `interests` (and a feature
    /// of its own, so the server has not seen this `ver` yet), and answers the server's disco#info query
    /// about them. Returns the `ver`.
    @discardableResult
    private func announce(_ client: TestClient, interests: [String]) async throws -> String {
        let features = ["http://jabber.org/protocol/caps", "http://jabber.org/protocol/disco#info", "urn:starling:test:\(UUID().uuidString)"]
            + interests.map { $0 + "+notify" }
        let ver = Self.capsVer(identity: "client/pc//Starling test", features: features)
        client.send("<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://starling.example/test' ver='\(ver)'/></presence>")
        let query = try await client.expect("disco#info about our caps") {
            $0.name == "iq" && $0[attribute: "type"] == "get" && $0.child("query", namespace: "http://jabber.org/protocol/disco#info") != nil
        }
        let node = query.child("query")?[attribute: "node"] ?? ""
        XCTAssertEqual(node, "https://starling.example/test#\(ver)")
        var answer = "<iq type='result' id='\(query[attribute: "id"]!)' to='\(query[attribute: "from"]!)'><query xmlns='http://jabber.org/protocol/disco#info' node='\(node)'>"
        answer += "<identity category='client' type='pc' name='Starling test'/>"
        for feature in features { answer += "<feature var='\(feature)'/>" }
        client.send(answer + "</query></iq>")
        return ver
    }

    /// XEP-0115 §5.1 for one identity and no forms, written out here independently of the server's code.
    static func capsVer(identity: String, features: [String]) -> String {
        let string = identity + "<" + features.sorted().map { $0 + "<" }.joined()
        return Data(Insecure.SHA1.hash(data: Data(string.utf8))).base64EncodedString()
    }

    private func iq(_ client: TestClient, _ xml: String, id: String) async throws -> XMLElement {
        try await client.iq(xml, id: id)
    }

    private func errorCondition(_ stanza: XMLElement) -> (String?, String?) {
        let error = stanza.child("error")
        return (error?.elements.first { $0.namespace == Namespace.stanzaErrors && $0.name != "text" }?.name,
                error?.elements.first { $0.namespace == Self.errors }?.name)
    }

    private func publish(_ client: TestClient, node: String, id: String? = nil, payload: String, options: [String: String] = [:],
                         iqID: String) async throws -> XMLElement {
        var xml = "<iq type='set' id='\(iqID)'><pubsub xmlns='\(Self.pubsub)'><publish node='\(node)'><item\(id.map { " id='\($0)'" } ?? "")>\(payload)</item></publish>"
        if !options.isEmpty {
            xml += "<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
            for (key, value) in options.sorted(by: { $0.key < $1.key }) { xml += "<field var='pubsub#\(key)'><value>\(value)</value></field>" }
            xml += "</x></publish-options>"
        }
        return try await iq(client, xml + "</pubsub></iq>", id: iqID)
    }

    private func event(_ client: TestClient, node: String, from publisher: String, _ description: String) async throws -> XMLElement {
        try await client.expect(description) {
            $0.name == "message" && $0[attribute: "from"] == publisher && $0.child("event", namespace: Self.event)?.elements.first?[attribute: "node"] == node
        }
    }

    /// Proves `client` got no PEP event before this point: a marker message sent now is the next message it sees.
    private func expectNoEvent(_ client: TestClient, marker sender: TestClient, to jid: String) async throws {
        let marker = UUID().uuidString
        sender.send("<message to='\(jid)' type='chat'><body>\(marker)</body></message>")
        let next = try await client.expect("the marker message") { $0.name == "message" }
        XCTAssertEqual(next.child("body")?.text, marker, "an event arrived that should not have: \(next.serialized())")
    }

    // MARK: Tests

    func testContactsWithNotifyGetPublishedItemsAndTheNewestOnComingOnline() async throws {
        let alice = try await login(1, resource: "phone")
        let bob = try await login(2, resource: "laptop")
        try await befriend(alice, "p1@localhost", bob, "p2@localhost")
        await bob.close()
        // Bob wants nicknames and avatars; his other resource wants nothing; Carol wants nicknames but
        // is not Alice's contact.
        let bobNotify = try await login(2, resource: "notify", notify: [Self.nick, Self.avatarMetadata])
        let bobQuiet = try await login(2, resource: "quiet", notify: [])
        let carol = try await login(3, resource: "c", notify: [Self.nick])
        try await announce(alice, interests: [Self.nick])
        _ = try await iq(bobNotify, "<iq type='get' id='sync1'><ping xmlns='urn:xmpp:ping'/></iq>", id: "sync1")

        let published = try await publish(alice, node: Self.nick, id: "current", payload: "<nick xmlns='\(Self.nick)'>Alice</nick>", iqID: "pub1")
        XCTAssertEqual(published[attribute: "type"], "result", published.serialized())
        XCTAssertEqual(published.child("pubsub")?.child("publish")?.child("item")?[attribute: "id"], "current")

        let notified = try await event(bobNotify, node: Self.nick, from: "p1@localhost", "Bob's nick notification")
        XCTAssertEqual(notified[attribute: "from"], "p1@localhost")
        XCTAssertEqual(notified[attribute: "type"], "headline")
        let item = notified.child("event")?.child("items")?.child("item")
        XCTAssertEqual(item?[attribute: "id"], "current")
        XCTAssertEqual(item?.child("nick", namespace: Self.nick)?.text, "Alice")
        // The publisher's own resource says +notify too, so it hears its own publication.
        _ = try await event(alice, node: Self.nick, from: "p1@localhost", "Alice's own notification")
        try await expectNoEvent(bobQuiet, marker: alice, to: "p2@localhost/quiet")
        try await expectNoEvent(carol, marker: alice, to: "p3@localhost/c")

        // Reading: a contact may (presence access model), a stranger may not.
        let read = try await iq(bobNotify, "<iq type='get' id='r1' to='p1@localhost'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.nick)'/></pubsub></iq>", id: "r1")
        XCTAssertEqual(read.child("pubsub")?.child("items")?.child("item")?.child("nick")?.text, "Alice")
        let refused = try await iq(carol, "<iq type='get' id='r2' to='p1@localhost'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.nick)'/></pubsub></iq>", id: "r2")
        XCTAssertEqual(errorCondition(refused).0, "not-authorized")
        XCTAssertEqual(errorCondition(refused).1, "presence-subscription-required")
        let foreignPublish = try await publish(bobNotify, node: "urn:example:status", payload: "<status xmlns='urn:example:status'>x</status>", iqID: "fp")
        XCTAssertEqual(foreignPublish[attribute: "type"], "result", "Bob publishes to his own PEP service")
        let intoAlices = try await iq(bobNotify, "<iq type='set' id='ia' to='p1@localhost'><pubsub xmlns='\(Self.pubsub)'><publish node='x'><item><x xmlns='urn:x'/></item></publish></pubsub></iq>", id: "ia")
        XCTAssertEqual(errorCondition(intoAlices).0, "forbidden")

        // Discovery: the account is a PEP service, and lists the nodes the asker may read.
        let info = try await iq(carol, "<iq type='get' id='d1' to='p1@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "d1")
        let identity = info.child("query")?.elements.first { $0.name == "identity" && $0[attribute: "category"] == "pubsub" }
        XCTAssertEqual(identity?[attribute: "type"], "pep")
        let ownInfo = try await iq(alice, "<iq type='get' id='d2' to='p1@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "d2")
        let features = ownInfo.child("query")?.elements.compactMap { $0[attribute: "var"] } ?? []
        XCTAssertTrue(features.contains("http://jabber.org/protocol/pubsub#publish-options"), "\(features)")
        let nodes = try await iq(bobNotify, "<iq type='get' id='d3' to='p1@localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", id: "d3")
        XCTAssertEqual(nodes.child("query")?.elements.map { $0[attribute: "node"] }, [Self.nick])
        let hidden = try await iq(carol, "<iq type='get' id='d4' to='p1@localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", id: "d4")
        XCTAssertEqual(hidden.child("query")?.elements.count, 0, "a stranger sees no presence-only node")

        // A resource coming online with +notify gets the newest item at once.
        let (bobTablet, tabletVer) = try await loginAnnouncing(2, resource: "tablet", notify: [Self.nick])
        let last = try await event(bobTablet, node: Self.nick, from: "p1@localhost", "the newest nick at presence")
        XCTAssertEqual(last.child("event")?.child("items")?.child("item")?.child("nick")?.text, "Alice")
        // A status change with the same capabilities sends nothing again, and asks nothing (the ver is known).
        bobTablet.send("<presence><show>away</show><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://starling.example/test' ver='\(tabletVer!)'/></presence>")
        _ = try await iq(bobTablet, "<iq type='get' id='again'><ping xmlns='urn:xmpp:ping'/></iq>", id: "again")
        try await expectNoEvent(bobTablet, marker: alice, to: "p2@localhost/tablet")

        // Retract with notify.
        let retracted = try await iq(alice, "<iq type='set' id='rt'><pubsub xmlns='\(Self.pubsub)'><retract node='\(Self.nick)' notify='true'><item id='current'/></retract></pubsub></iq>", id: "rt")
        XCTAssertEqual(retracted[attribute: "type"], "result")
        let retraction = try await event(bobNotify, node: Self.nick, from: "p1@localhost", "retraction")
        XCTAssertEqual(retraction.child("event")?.child("items")?.child("retract")?[attribute: "id"], "current")
        let missing = try await iq(alice, "<iq type='set' id='rt2'><pubsub xmlns='\(Self.pubsub)'><retract node='\(Self.nick)'><item id='current'/></retract></pubsub></iq>", id: "rt2")
        XCTAssertEqual(errorCondition(missing).0, "item-not-found")

        // Deleting the node tells the subscribers.
        let deleted = try await iq(alice, "<iq type='set' id='del'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='\(Self.nick)'/></pubsub></iq>", id: "del")
        XCTAssertEqual(deleted[attribute: "type"], "result")
        let deletion = try await bobNotify.expect("deletion") { $0.child("event", namespace: Self.event)?.child("delete")?[attribute: "node"] == Self.nick }
        XCTAssertEqual(deletion[attribute: "from"], "p1@localhost")
        let gone = try await iq(bobNotify, "<iq type='get' id='r3' to='p1@localhost'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.nick)'/></pubsub></iq>", id: "r3")
        XCTAssertEqual(errorCondition(gone).0, "item-not-found")
        for client in [alice, bobNotify, bobQuiet, bobTablet, carol] { await client.close() }
    }

    func testPublishOptionsAccessModelsAndQuotas() async throws {
        let owner = try await login(4, resource: "a", notify: [Self.bookmarks])
        let friend = try await login(5, resource: "b")
        try await befriend(owner, "p4@localhost", friend, "p5@localhost")
        let stranger = try await login(6, resource: "c")

        // XEP-0402 bookmarks: private (whitelist), as many items as the server keeps.
        let conference = "<conference xmlns='\(Self.bookmarks)' name='Lobby' autojoin='true'><nick>four</nick></conference>"
        let stored = try await publish(owner, node: Self.bookmarks, id: "lobby@conference.localhost", payload: conference,
                                       options: ["access_model": "whitelist", "max_items": "max", "persist_items": "true", "send_last_published_item": "never"],
                                       iqID: "bm1")
        XCTAssertEqual(stored[attribute: "type"], "result", stored.serialized())
        let second = try await publish(owner, node: Self.bookmarks, id: "den@conference.localhost",
                                       payload: "<conference xmlns='\(Self.bookmarks)' name='Den'/>",
                                       options: ["access_model": "whitelist", "max_items": "max", "persist_items": "true", "send_last_published_item": "never"],
                                       iqID: "bm2")
        XCTAssertEqual(second[attribute: "type"], "result", second.serialized())
        let mine = try await iq(owner, "<iq type='get' id='bm3'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.bookmarks)'/></pubsub></iq>", id: "bm3")
        XCTAssertEqual(mine.child("pubsub")?.child("items")?.elements.map { $0[attribute: "id"] }, ["lobby@conference.localhost", "den@conference.localhost"],
                       "both kept, oldest first")
        XCTAssertEqual(mine.child("pubsub")?.child("items")?.elements.first?.child("conference")?.child("nick")?.text, "four")
        let one = try await iq(owner, "<iq type='get' id='bm4'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.bookmarks)'><item id='den@conference.localhost'/></items></pubsub></iq>", id: "bm4")
        XCTAssertEqual(one.child("pubsub")?.child("items")?.elements.map { $0[attribute: "id"] }, ["den@conference.localhost"])
        let closed = try await iq(friend, "<iq type='get' id='bm5' to='p4@localhost'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.bookmarks)'/></pubsub></iq>", id: "bm5")
        XCTAssertEqual(errorCondition(closed).0, "not-allowed")
        XCTAssertEqual(errorCondition(closed).1, "closed-node")

        // A precondition the node does not meet is refused, and nothing is published.
        let mismatch = try await publish(owner, node: Self.bookmarks, id: "x@conference.localhost", payload: "<conference xmlns='\(Self.bookmarks)'/>",
                                         options: ["access_model": "open"], iqID: "bm6")
        XCTAssertEqual(errorCondition(mismatch).0, "conflict")
        XCTAssertEqual(errorCondition(mismatch).1, "precondition-not-met")
        let configuration = try await iq(owner, "<iq type='get' id='cf'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='\(Self.bookmarks)'/></pubsub></iq>", id: "cf")
        let form = configuration.child("pubsub")?.child("configure")?.child("x", namespace: "jabber:x:data")
        let access = form?.elements.first { $0[attribute: "var"] == "pubsub#access_model" }?.child("value")?.text
        XCTAssertEqual(access, "whitelist")

        // OMEMO's device list is open: anyone may read it, contact or not.
        let devices = "<list xmlns='eu.siacs.conversations.axolotl'><device id='12345'/></list>"
        let open = try await publish(owner, node: Self.omemoDevices, id: "current", payload: devices, options: ["access_model": "open"], iqID: "om1")
        XCTAssertEqual(open[attribute: "type"], "result", open.serialized())
        let read = try await iq(stranger, "<iq type='get' id='om2' to='p4@localhost'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.omemoDevices)' max_items='1'/></pubsub></iq>", id: "om2")
        XCTAssertEqual(read.child("pubsub")?.child("items")?.child("item")?.child("list")?.child("device")?[attribute: "id"], "12345")

        // max_items keeps the newest; configure can lower it.
        for index in 1...3 {
            let answer = try await publish(owner, node: "urn:example:log", id: "e\(index)", payload: "<entry xmlns='urn:example:log'>\(index)</entry>",
                                           options: ["max_items": "2"], iqID: "log\(index)")
            XCTAssertEqual(answer[attribute: "type"], "result", answer.serialized())
        }
        let log = try await iq(owner, "<iq type='get' id='log4'><pubsub xmlns='\(Self.pubsub)'><items node='urn:example:log'/></pubsub></iq>", id: "log4")
        XCTAssertEqual(log.child("pubsub")?.child("items")?.elements.map { $0[attribute: "id"] }, ["e2", "e3"])

        // Quotas: item size, and nodes per account (4 here: bookmarks, devices, log, and one more).
        let big = String(repeating: "x", count: 5000)
        let tooBig = try await publish(owner, node: "urn:example:big", payload: "<big xmlns='urn:example:big'>\(big)</big>", iqID: "q1")
        XCTAssertEqual(errorCondition(tooBig).0, "not-acceptable")
        XCTAssertEqual(errorCondition(tooBig).1, "payload-too-big")
        let fourth = try await publish(owner, node: "urn:example:four", payload: "<four xmlns='urn:example:four'/>", iqID: "q2")
        XCTAssertEqual(fourth[attribute: "type"], "result")
        let fifth = try await publish(owner, node: "urn:example:five", payload: "<five xmlns='urn:example:five'/>", iqID: "q3")
        XCTAssertEqual(errorCondition(fifth).0, "not-allowed")
        XCTAssertEqual(errorCondition(fifth).1, "max-nodes-exceeded")
        let empty = try await iq(owner, "<iq type='set' id='q4'><pubsub xmlns='\(Self.pubsub)'><publish node='urn:example:four'><item id='x'/></publish></pubsub></iq>", id: "q4")
        XCTAssertEqual(errorCondition(empty).1, "payload-required")
        let unknownField = try await iq(owner, """
            <iq type='set' id='q5'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='urn:example:four'>\
            <x xmlns='jabber:x:data' type='submit'><field var='pubsub#no_such_option'><value>1</value></field></x></configure></pubsub></iq>
            """, id: "q5")
        XCTAssertEqual(errorCondition(unknownField).0, "not-acceptable")

        // Whitelisting the friend opens the bookmarks to them.
        let whitelisted = try await iq(owner, """
            <iq type='set' id='af'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><affiliations node='\(Self.bookmarks)'>\
            <affiliation jid='p5@localhost' affiliation='member'/></affiliations></pubsub></iq>
            """, id: "af")
        XCTAssertEqual(whitelisted[attribute: "type"], "result", whitelisted.serialized())
        let allowed = try await iq(friend, "<iq type='get' id='bm7' to='p4@localhost'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.bookmarks)'/></pubsub></iq>", id: "bm7")
        XCTAssertEqual(allowed.child("pubsub")?.child("items")?.elements.count, 2)
        for client in [owner, friend, stranger] { await client.close() }
    }

    func testSlixmppPublishesAvatarNickAndBookmarksAndUsesTheService() async throws {
        let (status, output) = try ServerProcess.slixmpp([
            "pep", "--port", "\(Self.server.directTLSPort)", "--tls", "direct",
            "--jid-a", "p7@localhost", "--password-a", "pw7", "--jid-b", "p8@localhost", "--password-b", "pw8",
        ])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("OK"), output)
    }

    /// A contact who gets a presence subscription while online is, for PEP, newly subscribed: it gets the
    /// newest items it wants at once, not only at its next presence.
    func testANewContactGetsTheNewestItemsOnSubscribing() async throws {
        let alice = try await login(15, resource: "a")
        let published = try await publish(alice, node: Self.nick, id: "current", payload: "<nick xmlns='\(Self.nick)'>Fifteen</nick>", iqID: "n15")
        XCTAssertEqual(published[attribute: "type"], "result", published.serialized())
        let bob = try await login(16, resource: "b", notify: [Self.nick])
        _ = try await iq(bob, "<iq type='get' id='sync16'><ping xmlns='urn:xmpp:ping'/></iq>", id: "sync16")
        try await befriend(alice, "p15@localhost", bob, "p16@localhost")
        let newest = try await event(bob, node: Self.nick, from: "p15@localhost", "the newest nick on subscribing")
        XCTAssertEqual(newest.child("event")?.child("items")?.child("item")?.child("nick")?.text, "Fifteen")
        for client in [alice, bob] { await client.close() }
    }

    /// XEP-0398: an open PEP avatar becomes the vCard photo, and its hash goes into presence (XEP-0153).
    func testAPEPAvatarBecomesTheVCardPhoto() async throws {
        let owner = try await login(13, resource: "o")
        let friend = try await login(14, resource: "f")
        try await befriend(owner, "p13@localhost", friend, "p14@localhost")
        let features = try await iq(owner, "<iq type='get' id='af'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "af")
        XCTAssertTrue(features.child("query")?.elements.contains { $0[attribute: "var"] == "urn:xmpp:pep-vcard-conversion:0" } ?? false)

        let image = Data((0..<600).map { UInt8($0 % 251) })
        let id = Insecure.SHA1.hash(data: image).map { String(format: "%02x", $0) }.joined()
        let data = try await publish(owner, node: "urn:xmpp:avatar:data", id: id, payload: "<data xmlns='urn:xmpp:avatar:data'>\(image.base64EncodedString())</data>",
                                     options: ["access_model": "open"], iqID: "av1")
        XCTAssertEqual(data[attribute: "type"], "result", data.serialized())
        let metadata = try await publish(owner, node: "urn:xmpp:avatar:metadata", id: id,
                                         payload: "<metadata xmlns='urn:xmpp:avatar:metadata'><info id='\(id)' bytes='\(image.count)' type='image/png'/></metadata>",
                                         options: ["access_model": "open"], iqID: "av2")
        XCTAssertEqual(metadata[attribute: "type"], "result", metadata.serialized())

        let vCard = try await iq(friend, "<iq type='get' id='vc' to='p13@localhost'><vCard xmlns='vcard-temp'/></iq>", id: "vc")
        let photo = vCard.child("vCard")?.child("PHOTO")
        XCTAssertEqual(photo?.child("TYPE")?.text, "image/png", vCard.serialized())
        XCTAssertEqual(photo?.child("BINVAL")?.text, image.base64EncodedString())
        owner.send("<presence><status>new look</status></presence>")
        let presence = try await friend.expect("presence with the new hash") { $0.name == "presence" && $0.child("status")?.text == "new look" }
        XCTAssertEqual(presence.child("x", namespace: "vcard-temp:x:update")?.child("photo")?.text, id)

        // Removing the avatar (empty metadata) takes the photo out.
        let removed = try await publish(owner, node: "urn:xmpp:avatar:metadata", id: "none", payload: "<metadata xmlns='urn:xmpp:avatar:metadata'/>", iqID: "av3")
        XCTAssertEqual(removed[attribute: "type"], "result", removed.serialized())
        let empty = try await iq(friend, "<iq type='get' id='vc2' to='p13@localhost'><vCard xmlns='vcard-temp'/></iq>", id: "vc2")
        XCTAssertNil(empty.child("vCard")?.child("PHOTO"), empty.serialized())
        for client in [owner, friend] { await client.close() }
    }

    // MARK: The service

    func testAServiceNodeWithSubscribersPublishersAndApproval() async throws {
        let owner = try await login(9, resource: "o")
        let reader = try await login(10, resource: "r")
        let writer = try await login(11, resource: "w")
        let outsider = try await login(12, resource: "x")
        let service = Self.service

        let info = try await iq(reader, "<iq type='get' id='si' to='\(service)'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "si")
        XCTAssertEqual(info.child("query")?.child("identity")?[attribute: "type"], "service")
        let listed = try await iq(reader, "<iq type='get' id='sl' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", id: "sl")
        XCTAssertTrue(listed.child("query")?.elements.contains { $0[attribute: "jid"] == service } ?? false, "the host lists the service")

        let created = try await iq(owner, """
            <iq type='set' id='c1' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><create node='news'/><configure>\
            <x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#node_config</value></field>\
            <field var='pubsub#title'><value>Site news</value></field><field var='pubsub#max_items'><value>10</value></field></x></configure></pubsub></iq>
            """, id: "c1")
        XCTAssertEqual(created[attribute: "type"], "result", created.serialized())
        let again = try await iq(writer, "<iq type='set' id='c2' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><create node='news'/></pubsub></iq>", id: "c2")
        XCTAssertEqual(errorCondition(again).0, "conflict")
        let instant = try await iq(writer, "<iq type='set' id='c3' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><create/></pubsub></iq>", id: "c3")
        XCTAssertNotNil(instant.child("pubsub")?.child("create")?[attribute: "node"], "an instant node gets a name")

        let subscribed = try await iq(reader, "<iq type='set' id='s1' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><subscribe node='news' jid='p10@localhost'/></pubsub></iq>", id: "s1")
        XCTAssertEqual(subscribed.child("pubsub")?.child("subscription")?[attribute: "subscription"], "subscribed", subscribed.serialized())
        let spoofed = try await iq(outsider, "<iq type='set' id='s2' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><subscribe node='news' jid='p10@localhost'/></pubsub></iq>", id: "s2")
        XCTAssertEqual(errorCondition(spoofed).1, "invalid-jid")

        let published = try await iq(owner, "<iq type='set' id='p1' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><publish node='news'><item id='first'><entry xmlns='http://www.w3.org/2005/Atom'><title>Hello</title></entry></item></publish></pubsub></iq>", id: "p1")
        XCTAssertEqual(published[attribute: "type"], "result", published.serialized())
        let event = try await reader.expect("the news") { $0.name == "message" && $0[attribute: "from"] == service && $0.child("event") != nil }
        XCTAssertEqual(event.child("event")?.child("items")?.child("item")?.child("entry")?.child("title")?.text, "Hello")

        // Only owners and publishers publish, until the owner makes someone a publisher.
        let refused = try await iq(writer, "<iq type='set' id='p2' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><publish node='news'><item><entry xmlns='http://www.w3.org/2005/Atom'/></item></publish></pubsub></iq>", id: "p2")
        XCTAssertEqual(errorCondition(refused).0, "forbidden")
        let promoted = try await iq(owner, """
            <iq type='set' id='a1' to='\(service)'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><affiliations node='news'>\
            <affiliation jid='p11@localhost' affiliation='publisher'/></affiliations></pubsub></iq>
            """, id: "a1")
        XCTAssertEqual(promoted[attribute: "type"], "result", promoted.serialized())
        let allowed = try await iq(writer, "<iq type='set' id='p3' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><publish node='news'><item id='second'><entry xmlns='http://www.w3.org/2005/Atom'><title>Again</title></entry></item></publish></pubsub></iq>", id: "p3")
        XCTAssertEqual(allowed[attribute: "type"], "result", allowed.serialized())
        _ = try await reader.expect("the second news") { $0.child("event")?.child("items")?.child("item")?[attribute: "id"] == "second" }
        let items = try await iq(outsider, "<iq type='get' id='i1' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><items node='news'/></pubsub></iq>", id: "i1")
        XCTAssertEqual(items.child("pubsub")?.child("items")?.elements.map { $0[attribute: "id"] }, ["first", "second"])
        let nodeInfo = try await iq(outsider, "<iq type='get' id='ni' to='\(service)'><query xmlns='http://jabber.org/protocol/disco#info' node='news'/></iq>", id: "ni")
        XCTAssertEqual(nodeInfo.child("query")?.child("identity")?[attribute: "type"], "leaf")
        let title = nodeInfo.child("query")?.child("x")?.elements.first { $0[attribute: "var"] == "pubsub#title" }?.child("value")?.text
        XCTAssertEqual(title, "Site news")
        let mine = try await iq(reader, "<iq type='get' id='ms' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><subscriptions/></pubsub></iq>", id: "ms")
        XCTAssertEqual(mine.child("pubsub")?.child("subscriptions")?.elements.map { $0[attribute: "node"] }, ["news"])

        // The owner sees and manages subscriptions; notifications can leave the payload out.
        let listedSubscriptions = try await iq(owner, "<iq type='get' id='os' to='\(service)'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><subscriptions node='news'/></pubsub></iq>", id: "os")
        XCTAssertEqual(listedSubscriptions.child("pubsub")?.child("subscriptions")?.elements.map { $0[attribute: "jid"] }, ["p10@localhost"])
        let managed = try await iq(owner, """
            <iq type='set' id='ms2' to='\(service)'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><subscriptions node='news'>\
            <subscription jid='p12@localhost' subscription='subscribed'/></subscriptions></pubsub></iq>
            """, id: "ms2")
        XCTAssertEqual(managed[attribute: "type"], "result", managed.serialized())
        _ = try await outsider.expect("told of the subscription") { $0.child("pubsub")?.child("subscription")?[attribute: "subscription"] == "subscribed" }
        _ = try await iq(owner, """
            <iq type='set' id='np' to='\(service)'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='news'>\
            <x xmlns='jabber:x:data' type='submit'><field var='pubsub#deliver_payloads'><value>0</value></field></x></configure></pubsub></iq>
            """, id: "np")
        _ = try await iq(owner, "<iq type='set' id='p5' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><publish node='news'><item id='bare'><entry xmlns='http://www.w3.org/2005/Atom'><title>Not sent</title></entry></item></publish></pubsub></iq>", id: "p5")
        let withoutPayload = try await outsider.expect("a notification without payload") { $0.child("event")?.child("items")?.child("item")?[attribute: "id"] == "bare" }
        XCTAssertTrue(withoutPayload.child("event")?.child("items")?.child("item")?.elements.isEmpty ?? false, withoutPayload.serialized())
        _ = try await reader.expect("the payload-less notification") { $0.child("event")?.child("items")?.child("item")?[attribute: "id"] == "bare" }

        // Unsubscribed, the reader hears nothing more.
        let left = try await iq(reader, "<iq type='set' id='u1' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><unsubscribe node='news' jid='p10@localhost'/></pubsub></iq>", id: "u1")
        XCTAssertEqual(left[attribute: "type"], "result", left.serialized())
        _ = try await iq(owner, "<iq type='set' id='p4' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><publish node='news'><item id='third'><entry xmlns='http://www.w3.org/2005/Atom'/></item></publish></pubsub></iq>", id: "p4")
        try await expectNoEvent(reader, marker: owner, to: "p10@localhost/r")

        // An authorize node: the subscription waits for an owner's approval through the form.
        let privateNode = try await iq(owner, """
            <iq type='set' id='c4' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><create node='private'/><configure>\
            <x xmlns='jabber:x:data' type='submit'><field var='pubsub#access_model'><value>authorize</value></field></x></configure></pubsub></iq>
            """, id: "c4")
        XCTAssertEqual(privateNode[attribute: "type"], "result", privateNode.serialized())
        let pending = try await iq(outsider, "<iq type='set' id='s3' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><subscribe node='private' jid='p12@localhost'/></pubsub></iq>", id: "s3")
        XCTAssertEqual(pending.child("pubsub")?.child("subscription")?[attribute: "subscription"], "pending")
        let notYet = try await iq(outsider, "<iq type='get' id='i2' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><items node='private'/></pubsub></iq>", id: "i2")
        XCTAssertEqual(errorCondition(notYet).1, "not-subscribed")
        let request = try await owner.expect("the approval form") { $0.name == "message" && $0.child("x", namespace: "jabber:x:data") != nil }
        let form = request.child("x", namespace: "jabber:x:data")
        XCTAssertEqual(form?.elements.first { $0[attribute: "var"] == "pubsub#subscriber_jid" }?.child("value")?.text, "p12@localhost")
        owner.send("""
            <message to='\(service)'><x xmlns='jabber:x:data' type='submit'>\
            <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#subscribe_authorization</value></field>\
            <field var='pubsub#node'><value>private</value></field><field var='pubsub#subscriber_jid'><value>p12@localhost</value></field>\
            <field var='pubsub#allow'><value>true</value></field></x></message>
            """)
        let outcome = try await outsider.expect("the approval") { $0.name == "message" && $0.child("pubsub")?.child("subscription") != nil }
        XCTAssertEqual(outcome.child("pubsub")?.child("subscription")?[attribute: "subscription"], "subscribed")
        let nowAllowed = try await iq(outsider, "<iq type='get' id='i3' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><items node='private'/></pubsub></iq>", id: "i3")
        XCTAssertEqual(nowAllowed[attribute: "type"], "result", nowAllowed.serialized())

        // A large newest item is not kept in memory, yet a new subscriber gets all of it.
        let large = String(repeating: "0123456789", count: 2_000)
        _ = try await iq(owner, "<iq type='set' id='c6' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><create node='large'/></pubsub></iq>", id: "c6")
        let bigPublish = try await iq(owner, "<iq type='set' id='p6' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><publish node='large'><item id='big'><blob xmlns='urn:example:blob'>\(large)</blob></item></publish></pubsub></iq>", id: "p6")
        XCTAssertEqual(bigPublish[attribute: "type"], "result", bigPublish.serialized())
        _ = try await iq(writer, "<iq type='set' id='s5' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><subscribe node='large' jid='p11@localhost/w'/></pubsub></iq>", id: "s5")
        let newest = try await writer.expect("the newest item on subscribing") { $0.child("event")?.child("items")?[attribute: "node"] == "large" }
        XCTAssertEqual(newest.child("event")?.child("items")?.child("item")?.child("blob")?.text.count, large.count)

        // Whitelist nodes refuse strangers; deleting a node tells its subscribers.
        let closed = try await iq(owner, """
            <iq type='set' id='c5' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><create node='closed'/><configure>\
            <x xmlns='jabber:x:data' type='submit'><field var='pubsub#access_model'><value>whitelist</value></field></x></configure></pubsub></iq>
            """, id: "c5")
        XCTAssertEqual(closed[attribute: "type"], "result")
        let stranger = try await iq(reader, "<iq type='set' id='s4' to='\(service)'><pubsub xmlns='\(Self.pubsub)'><subscribe node='closed' jid='p10@localhost'/></pubsub></iq>", id: "s4")
        XCTAssertEqual(errorCondition(stranger).1, "closed-node")
        let notOwner = try await iq(writer, "<iq type='set' id='d0' to='\(service)'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='private'/></pubsub></iq>", id: "d0")
        XCTAssertEqual(errorCondition(notOwner).0, "forbidden")
        let deleted = try await iq(owner, "<iq type='set' id='d1' to='\(service)'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='private'/></pubsub></iq>", id: "d1")
        XCTAssertEqual(deleted[attribute: "type"], "result")
        _ = try await outsider.expect("the deletion") { $0.child("event")?.child("delete")?[attribute: "node"] == "private" }
        for client in [owner, reader, writer, outsider] { await client.close() }
    }

    // MARK: In a cluster

    /// PEP and the service across two nodes: capabilities learnt on one node serve notifications sent from
    /// the other; the service is claimed by one node and used from both.
    func testPEPAndTheServiceAcrossClusterNodes() async throws {
        let cluster = try TestCluster(nodes: ["a", "b"], users: [("alice", "alice-pw"), ("bob", "bob-pw")])
        defer { cluster.stopAll() }
        try await cluster.waitUntil("a", sees: ["b"], as: "up")
        try await cluster.waitUntil("b", sees: ["a"], as: "up")
        func login(_ node: String, _ user: String) async throws -> TestClient {
            try await TestClient.login(port: cluster[node].directTLSPort, domain: "localhost", tls: .direct, username: user, password: "\(user)-pw",
                                       resource: node)
        }
        let alice = try await login("a", "alice")
        let bob = try await login("b", "bob")
        try await befriend(alice, "alice@localhost", bob, "bob@localhost")
        try await announce(bob, interests: [Self.nick])
        _ = try await iq(bob, "<iq type='get' id='sync'><ping xmlns='urn:xmpp:ping'/></iq>", id: "sync")

        // Node b verified Bob's capabilities and tells node a over the link; until a has heard, its
        // notifications skip Bob, so Alice publishes again until one arrives (each a new item).
        var notified: XMLElement?
        for attempt in 1...50 where notified == nil {
            let published = try await publish(alice, node: Self.nick, id: "n\(attempt)", payload: "<nick xmlns='\(Self.nick)'>Alice \(attempt)</nick>", iqID: "pub\(attempt)")
            XCTAssertEqual(published[attribute: "type"], "result", published.serialized())
            notified = try? await bob.expect("a notification from the other node", timeout: 0.2) {
                $0.name == "message" && $0[attribute: "from"] == "alice@localhost" && $0.child("event") != nil
            }
        }
        XCTAssertNotNil(notified?.child("event")?.child("items")?.child("item")?.child("nick"), "Bob on node b never heard Alice's publication on node a")
        let read = try await iq(bob, "<iq type='get' id='r' to='alice@localhost'><pubsub xmlns='\(Self.pubsub)'><items node='\(Self.nick)'/></pubsub></iq>", id: "r")
        XCTAssertEqual(read[attribute: "type"], "result", read.serialized())

        // The service: created from node a, subscribed from node b, published from node a.
        let created = try await iq(alice, "<iq type='set' id='c' to='\(Self.service)'><pubsub xmlns='\(Self.pubsub)'><create node='cluster-news'/></pubsub></iq>", id: "c")
        XCTAssertEqual(created[attribute: "type"], "result", created.serialized())
        let subscribed = try await iq(bob, "<iq type='set' id='s' to='\(Self.service)'><pubsub xmlns='\(Self.pubsub)'><subscribe node='cluster-news' jid='bob@localhost/b'/></pubsub></iq>", id: "s")
        XCTAssertEqual(subscribed.child("pubsub")?.child("subscription")?[attribute: "subscription"], "subscribed", subscribed.serialized())
        _ = try await iq(alice, "<iq type='set' id='p' to='\(Self.service)'><pubsub xmlns='\(Self.pubsub)'><publish node='cluster-news'><item id='x'><entry xmlns='http://www.w3.org/2005/Atom'/></item></publish></pubsub></iq>", id: "p")
        let event = try await bob.expect("the service's notification") { $0[attribute: "from"] == Self.service && $0.child("event") != nil }
        XCTAssertEqual(event.child("event")?.child("items")?.child("item")?[attribute: "id"], "x")
        for client in [alice, bob] { await client.close() }
    }
}
