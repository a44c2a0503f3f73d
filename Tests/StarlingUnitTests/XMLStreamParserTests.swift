import StarlingAPI
import StarlingXML
import XCTest

final class XMLStreamParserTests: XCTestCase {
    let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>"
    let stanzas = """
    <message to='juliet@example.com/balcony' id='m1' type='chat' xml:lang='en'><body>Wherefore &amp; why &lt;art&gt; thou?</body><x xmlns='urn:example:x' a='1&amp;2'/></message> \
    <presence/>\n\t<iq type='get' id='q'><query xmlns='jabber:iq:roster'/></iq>\
    <message><body>caf\u{e9} \u{1F600} <![CDATA[<raw>]]></body></message>
    """

    private func parseAllAtOnce(_ input: String) throws -> [XMLStreamEvent] {
        try XMLStreamParser().feed(input)
    }

    private func parseByteByByte(_ input: String) throws -> [XMLStreamEvent] {
        let parser = XMLStreamParser()
        var events: [XMLStreamEvent] = []
        for byte in input.utf8 { events += try parser.feed([byte]) }
        return events
    }

    private func parseInRandomChunks(_ input: String, seed: UInt64) throws -> [XMLStreamEvent] {
        let parser = XMLStreamParser()
        var events: [XMLStreamEvent] = []
        let bytes = Array(input.utf8)
        var rng = SplitMix(seed: seed)
        var index = 0
        while index < bytes.count {
            let length = min(bytes.count - index, Int(rng.next() % 17) + 1)
            events += try parser.feed(Array(bytes[index..<index + length]))
            index += length
        }
        return events
    }

    /// Releases libxml2's state after every chunk, as the server does after each read of a bound session.
    private func parseReleasingBetweenChunks(_ input: String, chunk: Int, limits: XMLStreamLimits = XMLStreamLimits()) throws -> (events: [XMLStreamEvent], releases: Int) {
        let parser = XMLStreamParser(limits: limits)
        var events: [XMLStreamEvent] = []
        var releases = 0
        let bytes = Array(input.utf8)
        var index = 0
        while index < bytes.count {
            let length = min(bytes.count - index, chunk)
            events += try parser.feed(Array(bytes[index..<index + length]))
            if parser.releaseBetweenStanzas() { releases += 1 }
            index += length
        }
        return (events, releases)
    }

    func testReleasingBetweenStanzasChangesNothingTheCallerSees() throws {
        let input = header + stanzas + "</stream:stream>"
        let whole = try parseAllAtOnce(input)
        for chunk in [1, 2, 3, 7, 16, 64, 1000] {
            let (events, releases) = try parseReleasingBetweenChunks(input, chunk: chunk)
            XCTAssertEqual(events, whole, "chunk \(chunk)")
            if chunk == 1 { XCTAssertGreaterThanOrEqual(releases, 4) }
        }
        // Whole stanzas per read, as clients send them; another stream prefix, an xml:lang on the header
        // and whitespace keepalives survive the copied header.
        let prefixedHeader = "<s:stream xmlns:s='http://etherx.jabber.org/streams' xmlns='jabber:client' xml:lang='en'>"
        let pieces = [prefixedHeader, "<message xml:lang='de'><body>a</body></message>", " ", "<presence/>\n",
                      "<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>", " ", " ", "</s:stream>"]
        let parser = XMLStreamParser()
        var events: [XMLStreamEvent] = []
        var releases = 0
        for piece in pieces {
            events += try parser.feed(piece)
            if parser.releaseBetweenStanzas() { releases += 1 }
        }
        XCTAssertEqual(events, try parseAllAtOnce(pieces.joined()))
        XCTAssertEqual(releases, pieces.count - 1)
        guard case .stanza(let message) = events[1] else { return XCTFail("no message") }
        XCTAssertEqual(message[attribute: "xml:lang"], "de")
    }

    func testLimitsStillHoldAfterARelease() throws {
        let limits = XMLStreamLimits(maxStanzaBytes: 1024, maxDepth: 4)
        let small = "<message><body>hi</body></message>"
        let big = "<message><body>" + String(repeating: "x", count: 2000) + "</body></message>"
        XCTAssertThrowsError(try parseReleasingBetweenChunks(header + small + small + big, chunk: 40, limits: limits)) { error in
            XCTAssertEqual(error as? XMLStreamError, .stanzaTooLarge(limit: 1024))
        }
        let deep = "<a><b><c><d><e/></d></c></b></a>"
        XCTAssertThrowsError(try parseReleasingBetweenChunks(header + small + deep, chunk: 40, limits: limits)) { error in
            XCTAssertEqual(error as? XMLStreamError, .tooDeep(limit: 4))
        }
        // Malformed input after a release is still not well-formed, not an artefact of the copied header.
        XCTAssertThrowsError(try parseReleasingBetweenChunks(header + small + "<message></iq>", chunk: 40)) { error in
            guard case .notWellFormed? = error as? XMLStreamError else { return XCTFail("\(error)") }
        }
    }

    func testStanzasAllAtOnceByteByByteAndInChunksAreIdentical() throws {
        let input = header + stanzas + "</stream:stream>"
        let whole = try parseAllAtOnce(input)
        XCTAssertEqual(whole.count, 6)
        XCTAssertEqual(try parseByteByByte(input), whole)
        for seed in 1...20 { XCTAssertEqual(try parseInRandomChunks(input, seed: UInt64(seed)), whole) }

        guard case .streamOpen(let streamHeader, let defaultNamespace) = whole[0] else { return XCTFail("no header") }
        XCTAssertEqual(streamHeader.name, "stream")
        XCTAssertEqual(streamHeader.namespace, Namespace.stream)
        XCTAssertEqual(defaultNamespace, Namespace.client)
        XCTAssertEqual(streamHeader[attribute: "to"], "example.com")

        guard case .stanza(let message) = whole[1] else { return XCTFail("no message") }
        XCTAssertEqual(message.name, "message")
        XCTAssertEqual(message.namespace, Namespace.client)
        XCTAssertEqual(message[attribute: "xml:lang"], "en")
        XCTAssertEqual(message.child("body")?.text, "Wherefore & why <art> thou?")
        XCTAssertEqual(message.child("x")?.namespace, "urn:example:x")
        XCTAssertEqual(message.child("x")?[attribute: "a"], "1&2")

        guard case .stanza(let iq) = whole[3] else { return XCTFail("no iq") }
        XCTAssertEqual(iq.child("query")?.namespace, "jabber:iq:roster")
        guard case .stanza(let unicode) = whole[4] else { return XCTFail("no unicode message") }
        XCTAssertEqual(unicode.child("body")?.text, "caf\u{e9} \u{1F600} <raw>")
        XCTAssertEqual(whole[5], .streamClose)
    }

    func testHeaderArrivesBeforeAnyStanza() throws {
        let parser = XMLStreamParser()
        let events = try parser.feed(header)
        XCTAssertEqual(events.count, 1)
        XCTAssertEqual(try parser.feed("<presence").count, 0)
        XCTAssertEqual(try parser.feed("/>").count, 1)
    }

    func testSerializationRoundTrips() throws {
        let events = try parseAllAtOnce(header + stanzas)
        for case .stanza(let element) in events {
            let text = element.serialized(inheritedNamespace: Namespace.client)
            let again = try XMLStreamParser().feed(header + text)
            XCTAssertEqual(again.last, .stanza(element), text)
        }
    }

    func testEscaping() {
        var element = XMLElement(name: "message", namespace: Namespace.client, attributes: ["to": "a'b\"<&>"])
        element.append(XMLElement(name: "body", namespace: Namespace.client).with(text: "<&>]]>"))
        XCTAssertEqual(
            element.serialized(inheritedNamespace: Namespace.client),
            "<message to='a&apos;b&quot;&lt;&amp;&gt;'><body>&lt;&amp;&gt;]]&gt;</body></message>"
        )
    }

    func testRestrictedXMLIsRefused() {
        let cases = [
            "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]><stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
            header + "<!-- a comment -->",
            header + "<?php echo 1 ?>",
        ]
        for input in cases {
            XCTAssertThrowsError(try parseAllAtOnce(input), input) { error in
                guard case .restrictedXML = error as? XMLStreamError else { return XCTFail("\(error)") }
            }
            XCTAssertThrowsError(try parseByteByByte(input), input) { error in
                guard case .restrictedXML = error as? XMLStreamError else { return XCTFail("\(error)") }
            }
        }
    }

    func testMalformedXMLIsNotWellFormed() {
        for input in [header + "<message></iq>", header + "<message>&undefined;</message>", header + "<a b='1' b='2'/>", header + "<1/>"] {
            XCTAssertThrowsError(try parseAllAtOnce(input), input) { error in
                guard case .notWellFormed = error as? XMLStreamError else { return XCTFail("\(error)") }
            }
        }
    }

    func testOversizedStanzaIsRefusedWithoutBufferingIt() throws {
        let parser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: 1000, maxDepth: 10))
        _ = try parser.feed(header)
        // Small stanzas in a long stream are fine: the limit is per stanza.
        for _ in 0..<50 { _ = try parser.feed("<message><body>" + String(repeating: "x", count: 500) + "</body></message>") }
        _ = try parser.feed("<message><body>")
        var caught: XMLStreamError?
        for _ in 0..<100 {
            do { _ = try parser.feed(String(repeating: "y", count: 100)) } catch { caught = error; break }
        }
        XCTAssertEqual(caught, .stanzaTooLarge(limit: 1000))
        // An unfinished start tag counts too.
        let tagParser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: 1000, maxDepth: 10))
        _ = try tagParser.feed(header)
        XCTAssertThrowsError(try tagParser.feed("<message a='" + String(repeating: "z", count: 2000)))
        // A stanza that arrives whole in one chunk is measured as well.
        let wholeParser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: 1000, maxDepth: 10))
        XCTAssertThrowsError(try wholeParser.feed(header + "<message><body>" + String(repeating: "w", count: 2000) + "</body></message>")) { error in
            XCTAssertEqual(error as? XMLStreamError, .stanzaTooLarge(limit: 1000))
        }
    }

    func testDeepNestingIsRefused() throws {
        let parser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: 100_000, maxDepth: 8))
        _ = try parser.feed(header)
        XCTAssertThrowsError(try parser.feed(String(repeating: "<a>", count: 20))) { error in
            XCTAssertEqual(error as? XMLStreamError, .tooDeep(limit: 8))
        }
    }

    func testResetStartsAFreshDocument() throws {
        let parser = XMLStreamParser()
        _ = try parser.feed(header + "<presence/>")
        parser.reset()
        let events = try parser.feed(header + "<presence/>")
        XCTAssertEqual(events.count, 2)
    }
}

/// A tiny deterministic generator so chunk splits are reproducible.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
