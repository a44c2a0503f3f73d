@testable import StarlingServer
import XCTest

/// The PROXY protocol header parser, fed whole and a byte at a time.
final class ProxyHeaderTests: XCTestCase {
    /// Parses every prefix of `bytes`: each shorter one must ask for more, the whole one give `expected`.
    private func check(_ bytes: [UInt8], _ expected: ProxyHeader.Outcome, file: StaticString = #filePath, line: UInt = #line) {
        guard case .header(_, let length) = expected else { return XCTAssertEqual(ProxyHeader.parse(bytes), expected, file: file, line: line) }
        for end in 0..<length {
            XCTAssertEqual(ProxyHeader.parse(bytes[..<end]), .needMoreData, "after \(end) bytes", file: file, line: line)
        }
        XCTAssertEqual(ProxyHeader.parse(bytes), expected, file: file, line: line)
    }

    private func v2(command: UInt8, family: UInt8, _ block: [UInt8]) -> [UInt8] {
        ProxyHeader.v2Signature + [0x20 | command, family, UInt8(block.count >> 8), UInt8(block.count & 0xFF)] + block
    }

    func testVersionOneLines() {
        let tcp4 = Array("PROXY TCP4 192.0.2.7 198.51.100.1 40000 5222\r\n".utf8)
        check(tcp4 + Array("<?xml".utf8), .header(.init(address: "192.0.2.7", port: 40000), length: tcp4.count))
        let tcp6 = Array("PROXY TCP6 2001:db8::7 2001:db8::1 1 5223\r\n".utf8)
        check(tcp6, .header(.init(address: "2001:db8::7", port: 1), length: tcp6.count))
        check(Array("PROXY UNKNOWN\r\n".utf8), .header(nil, length: 15))
        XCTAssertEqual(ProxyHeader.parse(Array("PROXY TCP4 999.0.2.7 198.51.100.1 40000 5222\r\n".utf8)), .invalid("malformed PROXY v1 line"))
        XCTAssertEqual(ProxyHeader.parse(Array("PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n".utf8)), .invalid("PROXY v1 protocol 'UDP4' is not TCP4, TCP6 or UNKNOWN"))
        XCTAssertEqual(ProxyHeader.parse(Array(("PROXY TCP4 " + String(repeating: "1", count: 120)).utf8)), .invalid("PROXY v1 line longer than 107 bytes"))
        XCTAssertEqual(ProxyHeader.parse(Array("<?xml version='1.0'?>".utf8)), .invalid("the connection does not start with a PROXY protocol header"))
    }

    func testVersionTwoHeaders() {
        let ipv4 = v2(command: 1, family: 0x11, [192, 0, 2, 7, 198, 51, 100, 1, 0x9C, 0x40, 0x14, 0x66])
        check(ipv4 + [0x16, 0x03], .header(.init(address: "192.0.2.7", port: 40000), length: ipv4.count))
        var ipv6Block = [UInt8](repeating: 0, count: 36)
        ipv6Block[0] = 0x20; ipv6Block[1] = 0x01; ipv6Block[2] = 0x0d; ipv6Block[3] = 0xb8; ipv6Block[15] = 7
        ipv6Block[32] = 0x01; ipv6Block[33] = 0xBB
        let ipv6 = v2(command: 1, family: 0x21, ipv6Block + [0x01, 0x00, 0x01, 0x41])  // and a TLV, skipped
        check(ipv6, .header(.init(address: "2001:db8::7", port: 443), length: ipv6.count))
        // LOCAL: the balancer's health check, addresses (if any) ignored.
        check(v2(command: 0, family: 0x11, [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]), .header(nil, length: 28))
        XCTAssertEqual(ProxyHeader.parse(v2(command: 1, family: 0x12, Array(repeating: 0, count: 12))),
                       .invalid("PROXY v2 family/transport 0x12 is not TCP over IPv4 or IPv6"))
        XCTAssertEqual(ProxyHeader.parse(v2(command: 1, family: 0x11, [1, 2, 3])), .invalid("PROXY v2 IPv4 addresses cut short"))
        XCTAssertEqual(ProxyHeader.parse(ProxyHeader.v2Signature + [0x21, 0x11, 0x10, 0x00]), .invalid("PROXY v2 header longer than 1024 bytes"))
        XCTAssertEqual(ProxyHeader.parse(ProxyHeader.v2Signature + [0x31, 0x11, 0, 0]), .invalid("PROXY v2 header of version 3"))
    }
}
