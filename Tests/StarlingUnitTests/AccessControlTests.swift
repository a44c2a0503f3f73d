import StarlingAPI
import StarlingConfig
import StarlingModules
import XCTest

/// `acl:` and `access_rules:` as read from YAML and as decided, without a server.
final class AccessControlTests: XCTestCase, ConfigParsing {
    static let yaml = """
    hosts: [example.org]
    acl:
      staff: { users: [Boss@Example.org], servers: [staff.example.org] }
      bots: { regexp: ["bot-[0-9]+@example\\\\.org"] }
      lan: { networks: [192.168.0.0/16, "fd00::/8", 10.1.2.3] }
      trusted: { lua: [trusted] }
    access_rules:
      rooms:
        - deny: bots
        - allow: staff
        - allow: lan
        - allow: trusted
      members:
        - allow: local
    """

    func decide(_ control: AccessControl, _ rule: String, user: String?, address: String?, trusted: Set<String> = []) -> Bool {
        control.allows(rule, AccessSubject(user: user.flatMap { JID($0) }, address: address), isLocal: { $0 == "example.org" }) { name, subject in
            name == "trusted" && subject.user.map { trusted.contains($0.bare.description) } ?? false
        }
    }

    func testListsAndFirstMatchingEntryDecide() throws {
        let access = try parse(Self.yaml).access
        XCTAssertTrue(decide(access, "rooms", user: "boss@example.org/phone", address: nil), "users match case-insensitively, bare")
        XCTAssertTrue(decide(access, "rooms", user: "anyone@staff.example.org", address: nil), "servers")
        XCTAssertFalse(decide(access, "rooms", user: "bot-12@example.org", address: "192.168.1.1"), "the first matching entry decides")
        XCTAssertTrue(decide(access, "rooms", user: "bot-x@example.org", address: "192.168.1.1"), "the pattern matches whole JIDs only")
        XCTAssertTrue(decide(access, "rooms", user: "u@example.org", address: "fd12::1"))
        XCTAssertTrue(decide(access, "rooms", user: "u@example.org", address: "::ffff:192.168.9.9"), "IPv4-mapped IPv6")
        XCTAssertTrue(decide(access, "rooms", user: nil, address: "10.1.2.3"), "a bare address is a /32")
        XCTAssertFalse(decide(access, "rooms", user: nil, address: "10.1.2.4"))
        XCTAssertFalse(decide(access, "rooms", user: "u@example.org", address: "8.8.8.8"), "no match denies")
        XCTAssertTrue(decide(access, "rooms", user: "u@example.org", address: nil, trusted: ["u@example.org"]), "the Lua predicate")
        XCTAssertTrue(decide(access, "members", user: "u@example.org", address: nil))
        XCTAssertFalse(decide(access, "members", user: "u@elsewhere.net", address: nil))
        XCTAssertTrue(decide(access, "all", user: nil, address: nil))
        XCTAssertFalse(decide(access, "none", user: "boss@example.org", address: nil))
        XCTAssertFalse(decide(access, "undefined", user: "boss@example.org", address: nil))
    }

    func testNetworks() throws {
        let network = try XCTUnwrap(IPNetwork("172.16.0.0/12"))
        XCTAssertEqual(network.prefix, 12)
        XCTAssertNil(IPNetwork("172.16.0.0/33"))
        XCTAssertNil(IPNetwork("not-an-address"))
        XCTAssertNil(IPNetwork("::1/129"))
        XCTAssertEqual(IPNetwork("::1")?.prefix, 128)
    }

    func testMistakesAreReportedWhereTheyAreWritten() {
        expectError("acl:\n  lan: { networks: [10.0.0.0/40] }\n", line: 2, key: "acl.lan.networks", contains: "not an address or CIDR network")
        expectError("acl:\n  bad: { regexp: [\"(\"] }\n", line: 2, key: "acl.bad.regexp", contains: "not a valid regular expression")
        expectError("acl:\n  x:\n    user: [a@b]\n", line: 3, key: "acl.x.user", contains: "did you mean 'users'")
        expectError("acl:\n  all: { users: [a@b] }\n", line: 2, key: "acl.all", contains: "built in")
        expectError("access_rules:\n  r:\n    - allow: nobody\n", line: 3, key: "access_rules.r", contains: "no list 'nobody' in acl")
        expectError("access_rules:\n  r:\n    - permit: all\n", line: 3, key: "access_rules.r", contains: "`allow: LIST` or `deny: LIST`")
        expectError("access_rules:\n  r: all\n", line: 2, key: "access_rules.r", contains: "expected a list")
        expectError("auth:\n  access: c2s\n", line: 2, key: "auth.access", contains: "no access rule 'c2s'")
        expectError("auth:\n  mechanism_access: { DIGEST-MD5: all }\n", line: 2, key: "auth.mechanism_access.DIGEST-MD5", contains: "unknown mechanism")
        expectError("modules:\n  muc: { access_create: admins_only }\n", line: 2, key: "modules.muc.access_create", contains: "no access rule 'admins_only'")
        XCTAssertNoThrow(try parse("access_rules:\n  admins_only:\n    - allow: local\nmodules:\n  muc: { access_create: admins_only }\n"))
    }
}
