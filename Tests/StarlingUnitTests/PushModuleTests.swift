import StarlingAPI
@testable import StarlingModules
import StarlingStorage
import StarlingXML
import XCTest

/// What wakes a phone, and the claim flag every node computes alike.
final class PushModuleTests: XCTestCase {
    func element(_ xml: String) -> XMLElement {
        let events = try! XMLStreamParser().feed("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>" + xml)
        guard case .stanza(let element) = events.last! else { fatalError("no element in \(xml)") }
        return element
    }

    func testWhatIsWorthANotification() {
        let notable = [
            "<message type='chat'><body>hi</body></message>",
            "<message><body>a normal message</body></message>",
            "<message type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>",
            "<message><x xmlns='jabber:x:conference' jid='room@conference.example'/></message>",
            "<message><x xmlns='http://jabber.org/protocol/muc#user'><invite from='a@example'/></x></message>",
        ]
        for xml in notable { XCTAssertNotNil(PushModule.notable(element(xml)), xml) }
        let quiet = [
            "<message type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message type='groupchat'><body>room chatter</body></message>",
            "<message type='headline'><body>news</body></message>",
            "<message type='error'><body>bounced</body></message>",
            "<message><received xmlns='urn:xmpp:receipts' id='1'/></message>",
            "<presence/>",
        ]
        for xml in quiet { XCTAssertNil(PushModule.notable(element(xml)), xml) }
        let carbon = element("<message type='chat'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
            + "<message xmlns='jabber:client' from='juliet@example' type='chat'><body>inside</body></message></forwarded></received></message>")
        XCTAssertEqual(PushModule.notable(carbon)?.child("body")?.text, "inside", "a received carbon is about the message it carries")
        let sent = element("<message type='chat'><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
            + "<message xmlns='jabber:client' type='chat'><body>mine</body></message></forwarded></sent></message>")
        XCTAssertNil(PushModule.notable(sent), "what the account sent itself wakes nobody")
    }

    func testClaimFlagsAreStableAndDistinct() {
        let one = PushRegistration(service: JID("push.example")!, node: "a")
        XCTAssertEqual(PushModule.flag(one), PushModule.flag(PushRegistration(service: JID("push.example")!, node: "a", publishOptions: "<x/>")))
        XCTAssertEqual(PushModule.flag(one), "push:7d2dd5600e6e2ab2", "FNV-1a (from Python), not Swift's per-process seeded hasher")
        XCTAssertNotEqual(PushModule.flag(one), PushModule.flag(PushRegistration(service: JID("push.example")!, node: "b")))
        XCTAssertNotEqual(PushModule.flag(PushRegistration(service: JID("push.examplea")!, node: "")), PushModule.flag(PushRegistration(service: JID("push.example")!, node: "a")))
    }

    func testRemoteDisablingNotice() {
        let account = JID("romeo@example")!
        let notice = element("<message from='push.example'><pubsub xmlns='http://jabber.org/protocol/pubsub' node='n1'>"
            + "<affiliation jid='romeo@example' affiliation='none'/></pubsub></message>")
        XCTAssertEqual(PushModule.revokedNode(notice, for: account), "n1")
        XCTAssertNil(PushModule.revokedNode(notice, for: JID("juliet@example")!), "about another account")
    }
}
