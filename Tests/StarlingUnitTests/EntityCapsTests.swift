import StarlingAPI
@testable import StarlingPubSub
import StarlingXML
import XCTest

/// XEP-0115 §5.2 and §5.3: the verification string and its hash for the specification's own examples,
/// which is what decides whether the server shares a learnt feature set between clients.
final class EntityCapsTests: XCTestCase {
    func testSimpleExampleFromTheSpecification() throws {
        let info = try XCTUnwrap(XMLFragmentParser.parse("""
            <query xmlns='http://jabber.org/protocol/disco#info'>
              <identity category='client' name='Exodus 0.9.1' type='pc'/>
              <feature var='http://jabber.org/protocol/caps'/>
              <feature var='http://jabber.org/protocol/disco#info'/>
              <feature var='http://jabber.org/protocol/disco#items'/>
              <feature var='http://jabber.org/protocol/muc'/>
            </query>
            """))
        XCTAssertEqual(EntityCaps.verificationString(info),
                       "client/pc//Exodus 0.9.1<http://jabber.org/protocol/caps<http://jabber.org/protocol/disco#info<"
                       + "http://jabber.org/protocol/disco#items<http://jabber.org/protocol/muc<")
        XCTAssertEqual(EntityCaps.verificationHash(info, hash: "sha-1"), "QgayPKawpkPSDYmwT/WM94uAlu0=")
        XCTAssertNil(EntityCaps.verificationHash(info, hash: "md2"), "an unknown hash function verifies nothing")
    }

    func testComplexExampleWithLanguagesAndAForm() throws {
        let info = try XCTUnwrap(XMLFragmentParser.parse("""
            <query xmlns='http://jabber.org/protocol/disco#info' node='http://psi-im.org#q07IKJEyjvHSyhy//CH0CxmKi8w='>
              <identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>
              <identity xml:lang='el' category='client' name='Ψ 0.11' type='pc'/>
              <feature var='http://jabber.org/protocol/caps'/>
              <feature var='http://jabber.org/protocol/disco#info'/>
              <feature var='http://jabber.org/protocol/disco#items'/>
              <feature var='http://jabber.org/protocol/muc'/>
              <x xmlns='jabber:x:data' type='result'>
                <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>
                <field var='ip_version' type='text-multi'><value>ipv4</value><value>ipv6</value></field>
                <field var='os'><value>Mac</value></field>
                <field var='os_version'><value>10.5.1</value></field>
                <field var='software'><value>Psi</value></field>
                <field var='software_version'><value>0.11</value></field>
              </x>
            </query>
            """))
        XCTAssertEqual(EntityCaps.verificationHash(info, hash: "sha-1"), "q07IKJEyjvHSyhy//CH0CxmKi8w=")
    }

    func testAPresenceWithoutCapabilitiesAdvertisesNothing() throws {
        let plain = try XCTUnwrap(XMLFragmentParser.parse("<presence><show>away</show></presence>"))
        XCTAssertNil(EntityCaps.Advertised(plain))
        let legacy = try XCTUnwrap(XMLFragmentParser.parse("<presence><c xmlns='http://jabber.org/protocol/caps' node='n' ver='1.0'/></presence>"))
        XCTAssertNil(EntityCaps.Advertised(legacy)?.hash, "pre-1.4 capabilities name no hash")
        XCTAssertNil(EntityCaps().features(of: JID("a@b/c")!, presence: legacy), "nothing is known before the client answered")
    }
}
