import Foundation
import StarlingAPI
import StarlingLua
import StarlingSASL
import StarlingPortable
import XCTest

/// The importers' readers, on files made here: XEP-0227 with XInclude (and what they refuse), SCRAM keys in
/// ejabberd's and Prosody's forms, and Lua data files read by Lua.
final class ImportReaderTests: XCTestCase {
    var folder: URL!

    override func setUpWithError() throws {
        folder = FileManager.default.temporaryDirectory.appendingPathComponent("import-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("export"), withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(at: folder)
    }

    func write(_ text: String, _ name: String) throws -> String {
        let path = folder.appendingPathComponent(name).path
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func expectFailure(_ path: String, _ text: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try PortableImport.read(path: path), file: file, line: line) { error in
            XCTAssertTrue("\(error)".contains(text), "\(error)", file: file, line: line)
        }
    }

    func testIncludedHostFilesAreReadFromTheExportsFolderOnly() throws {
        let credentials = SCRAMCredentials.generate(password: "pw", hash: .sha1, iterations: 4096)
        // ejabberd writes each SCRAM value as base64 of the base64 text it stores.
        func twice(_ bytes: [UInt8]) -> String { Data(Data(bytes).base64EncodedString().utf8).base64EncodedString() }
        _ = try write("""
        <?xml version='1.0' encoding='UTF-8'?><host xmlns='urn:xmpp:pie:0' jid='example.org'><user name='carol'><scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-1'><iter-count>4096</iter-count><salt>\(twice(credentials.salt))</salt><server-key>\(twice(credentials.serverKey))</server-key><stored-key>\(twice(credentials.storedKey))</stored-key></scram-credentials></user><user name='dave' password='secret'/></host>
        """, "export/dump_example_org.xml")
        let main = try write("""
        <?xml version='1.0' encoding='UTF-8'?><server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'><xi:include href='dump_example_org.xml'/></server-data>
        """, "export/dump.xml")
        let accounts = try PortableImport.read(path: main)
        XCTAssertEqual(accounts.map(\.username), ["carol", "dave"])
        XCTAssertEqual(accounts[0].credentials, [credentials])
        XCTAssertEqual(accounts[1].password, "secret")
        // The host file alone is an export too.
        XCTAssertEqual(try PortableImport.read(path: folder.appendingPathComponent("export/dump_example_org.xml").path).count, 2)

        _ = try write("<host xmlns='urn:xmpp:pie:0' jid='example.org'/>", "outside.xml")
        let escaping = try write("<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'><xi:include href='../outside.xml'/></server-data>", "export/escape.xml")
        expectFailure(escaping, "leads outside the export's folder")
        let absolute = try write("<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'>\n<xi:include href='/etc/passwd'/></server-data>", "export/absolute.xml")
        expectFailure(absolute, "absolute.xml:2: <xi:include href='/etc/passwd'/>: only files in the export's folder")
        let remote = try write("<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'><xi:include href='http://example.org/x.xml'/></server-data>", "export/remote.xml")
        expectFailure(remote, "no URL")
    }

    func testWhatItDoesNotUnderstandIsAnErrorNamingElementAndLine() throws {
        let unknown = try write("""
        <server-data xmlns='urn:xmpp:pie:0'>
          <host jid='example.org'>
            <user name='alice' password='pw'>
              <query xmlns='jabber:iq:roster'/>
              <mystery xmlns='urn:example:unknown'/>
            </user>
          </host>
        </server-data>
        """, "unknown.xml")
        expectFailure(unknown, "unknown.xml:5: unexpected <mystery xmlns='urn:example:unknown'/> in <user name='alice'/>")
        expectFailure(try write("<accounts/>", "other.xml"), "not a XEP-0227 document")
        expectFailure(try write("<server-data xmlns='urn:xmpp:pie:0'><host jid='x'>", "broken.xml"), "not well-formed XML")
        // Known but not carried over: counted, not an error.
        let privacy = try write("<host xmlns='urn:xmpp:pie:0' jid='example.org'><user name='a' password='p'><query xmlns='jabber:iq:privacy'/></user></host>", "privacy.xml")
        XCTAssertEqual(try PortableImport.read(path: privacy).first?.skipped, ["privacy lists (not imported)"])
    }

    func testKeysInTheFormsOtherServersWrite() {
        let key = (0..<20).map { UInt8($0) }
        XCTAssertEqual(ImportedKeys.key(Data(key).base64EncodedString(), length: 20), key)
        XCTAssertEqual(ImportedKeys.key(Data(Data(key).base64EncodedString().utf8).base64EncodedString(), length: 20), key)
        XCTAssertEqual(ImportedKeys.key(key.map { String(format: "%02x", $0) }.joined(), length: 20), key)
        XCTAssertNil(ImportedKeys.key("not a key", length: 20))
        XCTAssertNil(ImportedKeys.key(Data(key).base64EncodedString(), length: 32), "a SHA-1 key is not a SHA-256 one")
    }

    func testLuaDataFilesAreReadByLuaWithNothingElseInReach() throws {
        let account = try LuaDataFile.parse(Data("""
        return {
        \t["iteration_count"] = 10000;
        \t["salt"] = "a\\0b\\255\\"";
        \t["stored_key"] = "5bc3ea71b682db2b084534bf5da0f8e2ee703b68";
        \t[false] = { ["pending"] = { ["bob@example.test"] = true; }; };
        \t["nested"] = { "text"; { ["name"] = "x"; }; };
        };
        """.utf8), name: "alice.dat")
        XCTAssertEqual(account["iteration_count"]?.int, 10000)
        XCTAssertEqual(account["salt"]?.bytes, [UInt8(ascii: "a"), 0, UInt8(ascii: "b"), 255, UInt8(ascii: "\"")])
        XCTAssertEqual(account["nested"]?.array.first?.text, "text")
        guard case .table(let pairs) = account else { return XCTFail("\(account)") }
        XCTAssertEqual(pairs.first { $0.key == .bool(false) }?.value["pending"]?.fields.map(\.key), ["bob@example.test"])

        let list = try LuaDataFile.parse(Data("item({ [\"name\"] = \"message\"; });\nitem({ [\"name\"] = \"presence\"; });\n".utf8), name: "alice.list")
        XCTAssertEqual(list.array.compactMap { $0["name"]?.text }, ["message", "presence"])

        XCTAssertThrowsError(try LuaDataFile.parse(Data("os.execute('touch /tmp/pwned'); return {}".utf8), name: "evil.dat")) { error in
            XCTAssertTrue("\(error)".contains("evil.dat:1"), "\(error)")
        }
        XCTAssertThrowsError(try LuaDataFile.parse(Data("while true do end".utf8), name: "loop.dat", instructionLimit: 100_000)) { error in
            XCTAssertTrue("\(error)".contains("runs too long"), "\(error)")
        }
        XCTAssertThrowsError(try LuaDataFile.parse(Data("return {".utf8), name: "cut.dat"))
    }

    func testAVCard4FromPEPBecomesVCardTempWithItsPhoto() throws {
        let item = try LuaDataFile.parse(Data("""
        item({ { { "Alice Liddell"; ["attr"] = {}; ["name"] = "text"; }; ["attr"] = {}; ["name"] = "fn"; };
               { { "Liddell"; ["attr"] = {}; ["name"] = "surname"; }; { "Alice"; ["attr"] = {}; ["name"] = "given"; }; ["attr"] = {}; ["name"] = "n"; };
               { { "alice@example.test"; ["attr"] = {}; ["name"] = "text"; }; ["attr"] = {}; ["name"] = "email"; };
               ["key"] = "current"; ["attr"] = { ["xmlns"] = "urn:ietf:params:xml:ns:vcard-4.0"; }; ["name"] = "vcard"; });
        """.utf8), name: "alice.list")
        let card = try XCTUnwrap(item.array.last.flatMap { ProsodyImport.element($0, inherited: "") })
        let vCard = ProsodyImport.vCardTemp(from: card, photoType: "image/jpeg", photoData: "aGVsbG8=\n")
        XCTAssertEqual(vCard.serialized(), "<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN><N><FAMILY>Liddell</FAMILY><GIVEN>Alice</GIVEN></N>"
                       + "<EMAIL><USERID>alice@example.test</USERID></EMAIL><PHOTO><TYPE>image/jpeg</TYPE><BINVAL>aGVsbG8=</BINVAL></PHOTO></vCard>")
    }

    func testProsodyStanzasBecomeElementsInTheirNamespaces() throws {
        let stored = try LuaDataFile.parse(Data("""
        return { ["name"] = "vCard"; ["attr"] = { ["xmlns"] = "vcard-temp"; }; { ["name"] = "FN"; ["attr"] = {}; "Alice"; }; };
        """.utf8), name: "vcard.dat")
        let element = try XCTUnwrap(ProsodyImport.element(stored, inherited: ""))
        XCTAssertEqual(element.serialized(), "<vCard xmlns='vcard-temp'><FN>Alice</FN></vCard>")
    }
}
