import StarlingAPI
import XCTest

final class JIDTests: XCTestCase {
    /// (input, canonical form) for addresses RFC 7622 accepts.
    let valid: [(String, String)] = [
        ("juliet@example.com", "juliet@example.com"),
        ("juliet@example.com/foo", "juliet@example.com/foo"),
        ("juliet@example.com/foo bar", "juliet@example.com/foo bar"),
        ("juliet@example.com/foo@bar", "juliet@example.com/foo@bar"),
        ("juliet@example.com/a/b", "juliet@example.com/a/b"),
        ("foo\\20bar@example.com", "foo\\20bar@example.com"),
        ("fussball@example.com", "fussball@example.com"),
        ("fu\u{DF}ball@example.com", "fu\u{DF}ball@example.com"),
        ("\u{3C0}@example.com", "\u{3C0}@example.com"),
        ("\u{3A3}@example.com/foo", "\u{3C3}@example.com/foo"),
        ("King@example.com/\u{3A3}", "king@example.com/\u{3A3}"),
        ("JULIET@EXAMPLE.COM/Balcony", "juliet@example.com/Balcony"),
        ("example.com", "example.com"),
        ("example.com/foobar", "example.com/foobar"),
        ("a.example.com/b@example.net", "a.example.com/b@example.net"),
        ("[::1]", "[::1]"),
        ("juliet@192.0.2.1", "juliet@192.0.2.1"),
        ("\u{FF4A}\u{FF55}\u{FF4C}\u{FF49}\u{FF45}\u{FF54}@example.com", "juliet@example.com"),
        ("juliet@example.com.", "juliet@example.com"),
        ("juliet@example.com/A\u{30A}", "juliet@example.com/\u{C5}"),
        ("juliet@m\u{FC}nchen.example", "juliet@m\u{FC}nchen.example"),
        ("juliet@example.com/\u{265A}", "juliet@example.com/\u{265A}"),
        ("juliet@example.com/foo\u{3000}bar", "juliet@example.com/foo bar"),
    ]

    /// Addresses that must be refused.
    let invalid: [String] = [
        "\"juliet\"@example.com",
        "foo bar@example.com",
        "juliet@example.com/",
        "@example.com/",
        "@example.com",
        "henry\u{2163}@example.com",
        "\u{265A}@example.com",
        "juliet@",
        "/foobar",
        "",
        "user@exa mple.com",
        "juliet@example.com/\u{7}bell",
        "juliet@-bad.example",
        "juliet@bad..example",
        "a&b@example.com",
        "a'b@example.com",
        "a:b@example.com",
        "a<b@example.com",
        "juliet@example.com/\u{200B}",
        String(repeating: "a", count: 1024) + "@example.com",
        "juliet@" + String(repeating: "a", count: 64) + ".example",
        "juliet@[::1",
    ]

    func testValidAddressesAreAcceptedInCanonicalForm() {
        for (input, canonical) in valid {
            do {
                let jid = try JID(parsing: input)
                XCTAssertEqual(jid.description, canonical, "for \(input.debugDescription)")
            } catch {
                XCTFail("\(input.debugDescription) was refused: \(error)")
            }
        }
    }

    func testInvalidAddressesAreRefused() {
        for input in invalid {
            XCTAssertThrowsError(try JID(parsing: input), "\(input.debugDescription) was accepted")
        }
    }

    func testPartsAndEquality() throws {
        let jid = try JID(parsing: "Romeo@Example.NET/Orchard")
        XCTAssertEqual(jid.localpart, "romeo")
        XCTAssertEqual(jid.domainpart, "example.net")
        XCTAssertEqual(jid.resourcepart, "Orchard")
        XCTAssertEqual(jid.bare.description, "romeo@example.net")
        XCTAssertEqual(jid.domain.description, "example.net")
        XCTAssertEqual(jid, try JID(parsing: "romeo@example.net/Orchard"))
        XCTAssertNotEqual(jid, try JID(parsing: "romeo@example.net/orchard"), "resources are case-sensitive")
        XCTAssertEqual(Set([jid, try JID(parsing: "ROMEO@example.net/Orchard")]).count, 1)
    }
}
