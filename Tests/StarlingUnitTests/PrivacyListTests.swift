import StarlingAPI
@testable import StarlingModules
import StarlingStorage
import StarlingXML
import XCTest

/// XEP-0016's rule semantics, directly: first match by order wins, JID matching per §2.1, groups and
/// subscriptions from the roster, rules limited to stanza kinds.
final class PrivacyListTests: XCTestCase {
    private func jid(_ text: String) -> JID { JID(text)! }

    func testTheFirstMatchingRuleByOrderDecides() {
        let list = PrivacyList([
            PrivacyRule(type: nil, value: nil, action: "deny", order: 30),
            PrivacyRule(type: "jid", value: "friend@example.org", action: "allow", order: 10),
            PrivacyRule(type: "jid", value: "example.org", action: "deny", order: 20),
        ])
        XCTAssertEqual(list.denies(.message, contact: jid("friend@example.org/phone"), rosterItem: nil), false, "a bare JID rule covers every resource")
        XCTAssertEqual(list.denies(.message, contact: jid("other@example.org"), rosterItem: nil), true, "a domain rule covers its users")
        XCTAssertEqual(list.denies(.message, contact: jid("x@elsewhere.net"), rosterItem: nil), true, "the fall-through rule")
        XCTAssertNil(PrivacyList([]).denies(.iq, contact: jid("a@b"), rosterItem: nil), "no rule, no decision")
    }

    func testJIDFormsMatchAsXEP0016Says() {
        func denied(_ value: String, _ contact: String) -> Bool {
            PrivacyList([PrivacyRule(type: "jid", value: value, action: "deny", order: 1)]).denies(.message, contact: jid(contact), rosterItem: nil) ?? false
        }
        XCTAssertTrue(denied("a@b/r", "a@b/r"))
        XCTAssertFalse(denied("a@b/r", "a@b/other"), "a full JID matches that resource only")
        XCTAssertFalse(denied("a@b/r", "a@b"))
        XCTAssertTrue(denied("b/r", "b/r"))
        XCTAssertFalse(denied("b/r", "a@b/r"), "domain/resource matches the domain's own resource only")
        XCTAssertTrue(denied("b", "a@b/anything"))
        XCTAssertFalse(denied("b", "a@sub.b"), "a domain does not cover its subdomains")
    }

    func testGroupsSubscriptionsAndKinds() {
        let list = PrivacyList([
            PrivacyRule(type: "group", value: "Work", action: "deny", order: 1, stanzas: ["presence-out"]),
            PrivacyRule(type: "subscription", value: "none", action: "deny", order: 2, stanzas: ["message"]),
        ])
        let colleague = RosterItem(jid: jid("boss@corp.example"), groups: ["Work"], subscription: .both)
        XCTAssertEqual(list.denies(.presenceOut, contact: colleague.jid, rosterItem: colleague), true)
        XCTAssertNil(list.denies(.message, contact: colleague.jid, rosterItem: colleague), "the group rule is about presence only")
        XCTAssertEqual(list.denies(.message, contact: jid("stranger@x.example"), rosterItem: nil), true, "not in the roster counts as subscription none")
        XCTAssertNil(list.denies(.other, contact: jid("stranger@x.example"), rosterItem: nil), "kind-limited rules leave other stanzas alone")
        XCTAssertTrue(list.needsRoster)
    }

    func testListsClientsSendAreChecked() throws {
        func parse(_ xml: String) -> Result<[PrivacyRule], PrivacyListProblem> {
            PrivacyList.parse(XMLFragmentParser.parse(xml)!, namespace: "jabber:iq:privacy", maxRules: 2)
        }
        let good = try parse("<list xmlns='jabber:iq:privacy' name='x'><item type='jid' value='A@Example.org' action='deny' order='1'><message/></item></list>").get()
        XCTAssertEqual(good, [PrivacyRule(type: "jid", value: "a@example.org", action: "deny", order: 1, stanzas: ["message"])], "JIDs are stored normalised")
        XCTAssertThrowsError(try parse("<list xmlns='jabber:iq:privacy' name='x'><item action='deny' order='1'/><item action='allow' order='1'/></list>").get(), "orders are unique")
        XCTAssertThrowsError(try parse("<list xmlns='jabber:iq:privacy' name='x'><item action='maybe' order='1'/></list>").get())
        XCTAssertThrowsError(try parse("<list xmlns='jabber:iq:privacy' name='x'><item type='subscription' value='some' action='deny' order='1'/></list>").get())
        XCTAssertThrowsError(try parse("<list xmlns='jabber:iq:privacy' name='x'><item action='deny' order='1'/><item action='deny' order='2'/><item action='deny' order='3'/></list>").get(),
                             "at most max_items")
    }
}
