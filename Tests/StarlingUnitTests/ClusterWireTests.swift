import NIOCore
import NIOEmbedded
import StarlingAPI
import StarlingCluster
import XCTest

/// The node link's wire form and handshake, without sockets.
final class ClusterWireTests: XCTestCase {
    private static let presence: XMLElement = {
        var presence = XMLElement(name: "presence", namespace: Namespace.client, attributes: ["from": "a@localhost/r"])
        presence.append(XMLElement(name: "priority", namespace: Namespace.client).with(text: "5"))
        var caps = XMLElement(name: "c", namespace: "http://jabber.org/protocol/caps", attributes: ["hash": "sha-1", "node": "n", "ver": "v="])
        caps.prefix = nil
        presence.append(caps)
        presence[attribute: "xml:lang"] = "en"
        return presence
    }()

    private static let frames: [ClusterFrame] = [
        .hello(version: ClusterFrame.wireVersion, cluster: "c", node: "nöde-1", nonce: Array(repeating: 7, count: 32)),
        .proof(Array(0..<32)),
        .snapshotBegin,
        .sessions([
            ClusterSession(jid: JID("a@localhost/r")!, boundAt: 42, priority: -5, presence: presence, flags: ["carbons", "roster"]),
            ClusterSession(jid: JID("b@localhost/ü")!, boundAt: UInt64.max, priority: 127, presence: nil, flags: []),
        ]),
        .snapshotEnd,
        .session(ClusterSession(jid: JID("a@localhost/r")!, boundAt: 1, priority: 0, presence: presence, flags: [])),
        .unbound(JID("a@localhost/r")!, boundAt: 99),
        .deliver(message, recipients: [JID("b@localhost/x")!, JID("b@localhost/y")!], addressed: true),
        .claim("conference.localhost", claimedAt: 17),
        .component(message, from: JID("a@localhost/r")!, to: JID("room@conference.localhost/nick")!),
        .module(host: "localhost", XMLElement(name: "changed", namespace: "urn:example", attributes: ["jid": "a@localhost"])),
        .goodbye,
        .closeSession(JID("a@localhost/r")!, condition: "not-authorized"),
        .ping(123),
        .pong(UInt64.max),
        .resumeRequest(id: "abc-def.node-1", user: JID("a@localhost")!, request: 7),
        .resumeState(request: 7, MovedSession(jid: JID("a@localhost/phone")!, handled: 3, sent: UInt32.max, unacknowledged: [message, presence],
                                               presence: presence, flags: ["carbons", "push:1"],
                                               carried: [XMLElement(name: "directed", namespace: "urn:example", attributes: ["to": "room@conference.localhost/n"]),
                                                         XMLElement(name: "empty", namespace: "urn:example:2")])),
        .resumeState(request: 8, MovedSession(jid: JID("a@localhost/phone")!, handled: 0, sent: 0, unacknowledged: [], presence: nil, flags: [])),
        .resumeState(request: 9, nil),
    ]

    private static var message: XMLElement {
        var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["to": "b@localhost", "type": "chat"])
        message.append(XMLElement(name: "body", namespace: Namespace.client).with(text: "<&> \"quoted\" and ünïcode 🐦"))
        var nested = XMLElement(name: "x", namespace: "urn:example", prefix: "ex", attributes: [XMLAttribute(name: "a", value: "1")], children: [])
        nested.children = [.text("before"), .element(XMLElement(name: "empty", namespace: "urn:example")), .text("after")]
        message.append(nested)
        return message
    }

    private func encoded(_ frames: [ClusterFrame]) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: 1024)
        for frame in frames { frame.encode(into: &buffer) }
        return buffer
    }

    /// Feeds `bytes` to a decoder in slices of `step` bytes and returns what came out.
    private func decode(_ bytes: ByteBuffer, step: Int) throws -> [ClusterFrame] {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(ClusterFrameDecoder()))
        var remaining = bytes
        var frames: [ClusterFrame] = []
        while remaining.readableBytes > 0 {
            let slice = remaining.readSlice(length: min(step, remaining.readableBytes))!
            try channel.writeInbound(slice)
            while let frame = try channel.readInbound(as: ClusterFrame.self) { frames.append(frame) }
        }
        XCTAssertTrue(try channel.finish().isClean)
        return frames
    }

    func testEveryFrameSurvivesTheWireByteByByteAndAllAtOnce() throws {
        let bytes = encoded(Self.frames)
        XCTAssertEqual(try decode(bytes, step: 1), Self.frames)
        XCTAssertEqual(try decode(bytes, step: 7), Self.frames)
        XCTAssertEqual(try decode(bytes, step: bytes.readableBytes), Self.frames)
    }

    func testMalformedFramesEndTheLinkWithAReason() {
        func body(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }
        var unknown = body([200])
        XCTAssertThrowsError(try ClusterFrame.decode(&unknown)) { XCTAssertTrue("\($0)".contains("unknown frame type")) }
        // A count larger than what follows is refused before anything is allocated for it.
        var lying = body([4, 0xFF, 0xFF, 0xFF, 0xFF])
        XCTAssertThrowsError(try ClusterFrame.decode(&lying)) { XCTAssertTrue("\($0)".contains("bad count")) }
        var trailing = encoded([.ping(1)])
        trailing.moveReaderIndex(forwardBy: 4)
        trailing.writeInteger(UInt8(0))
        XCTAssertThrowsError(try ClusterFrame.decode(&trailing)) { XCTAssertTrue("\($0)".contains("trailing")) }
        var badJID = ByteBufferAllocator().buffer(capacity: 16)
        badJID.writeInteger(UInt8(7))
        badJID.writeInteger(UInt32(3))
        badJID.writeString("@@@")
        badJID.writeInteger(UInt64(1))
        XCTAssertThrowsError(try ClusterFrame.decode(&badJID)) { XCTAssertTrue("\($0)".contains("invalid JID")) }

        let channel = EmbeddedChannel(handler: ByteToMessageHandler(ClusterFrameDecoder()))
        var huge = ByteBufferAllocator().buffer(capacity: 8)
        huge.writeInteger(UInt32(ClusterFrame.maxFrameSize + 1))
        XCTAssertThrowsError(try channel.writeInbound(huge))
        _ = try? channel.finish()
    }

    func testElementsTooDeepAreRefused() {
        var element = XMLElement(name: "leaf")
        for _ in 0..<300 { element = XMLElement(name: "n", children: [.element(element)]) }
        var buffer = encoded([.deliver(element, recipients: [JID("a@b/c")!], addressed: false)])
        buffer.moveReaderIndex(forwardBy: 4)
        XCTAssertThrowsError(try ClusterFrame.decode(&buffer)) { XCTAssertTrue("\($0)".contains("too deeply")) }
    }

    // MARK: Handshake

    private func handshake(_ a: inout LinkHandshake, _ b: inout LinkHandshake) -> (LinkHandshake.Action, LinkHandshake.Action) {
        let helloA = a.hello, helloB = b.hello
        let replyA = a.received(helloB), replyB = b.received(helloA)
        guard case .send(let proofA) = replyA, case .send(let proofB) = replyB else { return (replyA, replyB) }
        return (a.received(proofB), b.received(proofA))
    }

    private let secret = Array("the cluster secret".utf8)
    private let digest: [UInt8] = Array(repeating: 1, count: 32)

    func testNodesThatShareTheSecretAndSeeTheSameCertificateLink() {
        var a = LinkHandshake(cluster: "c", node: "a", secret: secret, certificateDigest: digest)
        var b = LinkHandshake(cluster: "c", node: "b", secret: secret, certificateDigest: digest)
        let (outcomeA, outcomeB) = handshake(&a, &b)
        XCTAssertEqual(outcomeA, .established(peer: "b"))
        XCTAssertEqual(outcomeB, .established(peer: "a"))
        XCTAssertEqual(a.peer, "b")
        // Once up, handshake frames are refused.
        guard case .fail = a.received(b.hello) else { return XCTFail("a second hello was accepted") }
    }

    func testAWrongSecretAnotherCertificateAnotherClusterOrVersionIsRefused() {
        var a = LinkHandshake(cluster: "c", node: "a", secret: secret, certificateDigest: digest)
        var intruder = LinkHandshake(cluster: "c", node: "b", secret: Array("guess".utf8), certificateDigest: digest)
        var (outcomeA, outcomeB) = handshake(&a, &intruder)
        guard case .fail(let reason) = outcomeA else { return XCTFail("\(outcomeA)") }
        XCTAssertTrue(reason.contains("secret"), reason)
        guard case .fail = outcomeB else { return XCTFail("\(outcomeB)") }

        // A relay terminating TLS with a certificate of its own: each end hashes a different certificate.
        a = LinkHandshake(cluster: "c", node: "a", secret: secret, certificateDigest: digest)
        var relayed = LinkHandshake(cluster: "c", node: "b", secret: secret, certificateDigest: Array(repeating: 2, count: 32))
        (outcomeA, outcomeB) = handshake(&a, &relayed)
        guard case .fail = outcomeA, case .fail = outcomeB else { return XCTFail("a relayed link was accepted") }

        a = LinkHandshake(cluster: "c", node: "a", secret: secret, certificateDigest: digest)
        guard case .fail(let cluster) = a.received(.hello(version: ClusterFrame.wireVersion, cluster: "other", node: "b", nonce: Array(repeating: 0, count: 32))) else {
            return XCTFail("another cluster was accepted")
        }
        XCTAssertTrue(cluster.contains("other"), cluster)
        a = LinkHandshake(cluster: "c", node: "a", secret: secret, certificateDigest: digest)
        guard case .fail(let version) = a.received(.hello(version: ClusterFrame.wireVersion + 1, cluster: "c", node: "b", nonce: Array(repeating: 0, count: 32))) else {
            return XCTFail("another version was accepted")
        }
        XCTAssertTrue(version.contains("mixed versions"), version)
        a = LinkHandshake(cluster: "c", node: "a", secret: secret, certificateDigest: digest)
        guard case .fail = a.received(.hello(version: ClusterFrame.wireVersion, cluster: "c", node: "a", nonce: Array(repeating: 0, count: 32))) else {
            return XCTFail("a peer with this node's name was accepted")
        }
        a = LinkHandshake(cluster: "c", node: "a", secret: secret, certificateDigest: digest)
        guard case .fail = a.received(.ping(1)) else { return XCTFail("a frame before hello was accepted") }
    }
}

/// Who serves a component domain when nodes claim it.
final class ComponentClaimsTests: XCTestCase {
    func testTheEarlierClaimWinsAndTheLoserLetsGo() {
        var a = ComponentClaims(node: "a")
        let first = a.claim("conference.localhost", at: 100)
        XCTAssertTrue(first.new)
        XCTAssertFalse(a.claim("conference.localhost", at: 200).new, "claimed once")
        // A later claim from b is refused, and a repeats its own so b learns it lost.
        XCTAssertEqual(a.apply("conference.localhost", .init(node: "b", claimedAt: 150)), .refused(insist: first.claim))
        // An earlier one wins: a lets go.
        XCTAssertEqual(a.apply("conference.localhost", .init(node: "b", claimedAt: 50)), .accepted(releasedHere: true))
        XCTAssertEqual(a.table["conference.localhost"]?.node, "b")
        // Same time: the smaller name wins; a third node's later claim changes nothing and is not a's to answer.
        var c = ComponentClaims(node: "c")
        XCTAssertEqual(c.apply("muc.example", .init(node: "b", claimedAt: 7)), .accepted(releasedHere: false))
        XCTAssertEqual(c.apply("muc.example", .init(node: "a", claimedAt: 7)), .accepted(releasedHere: false))
        XCTAssertEqual(c.apply("muc.example", .init(node: "d", claimedAt: 9)), .refused(insist: nil))
        // A lost node's claims go; the next claimant is this node.
        c.drop(node: "a")
        XCTAssertNil(c.table["muc.example"])
        XCTAssertTrue(c.claim("muc.example", at: 20).new)
        XCTAssertEqual(c.local.map(\.domain), ["muc.example"])
    }
}
