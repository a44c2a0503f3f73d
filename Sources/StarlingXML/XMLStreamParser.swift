private import CLibXML2
public import StarlingAPI

/// What the stream parser produces, in document order.
public enum XMLStreamEvent: Equatable, Sendable {
    /// The stream header (`<stream:stream ...>`) arrived; `header` has its attributes and no children.
    case streamOpen(header: XMLElement, defaultNamespace: String?)
    /// A complete depth-1 element.
    case stanza(XMLElement)
    /// The stream's end tag arrived.
    case streamClose
}

/// Why the parser stopped. Each maps to one RFC 6120 stream error.
public enum XMLStreamError: Error, Equatable, Sendable {
    /// Not XML (`<not-well-formed/>`).
    case notWellFormed(String)
    /// DTD, entity declaration, comment or processing instruction (`<restricted-xml/>`).
    case restrictedXML(String)
    /// A stanza (or an unfinished tag) larger than the limit (`<policy-violation/>`).
    case stanzaTooLarge(limit: Int)
    /// Elements nested deeper than the limit (`<policy-violation/>`).
    case tooDeep(limit: Int)
}

/// Limits on what one stream may make the parser hold.
public struct XMLStreamLimits: Sendable {
    /// Bytes one stanza (and anything between stanzas) may span.
    public var maxStanzaBytes: Int
    /// Element depth below the stream element.
    public var maxDepth: Int

    public init(maxStanzaBytes: Int = 256 * 1024, maxDepth: Int = 32) {
        self.maxStanzaBytes = maxStanzaBytes
        self.maxDepth = maxDepth
    }
}

/// An incremental XMPP stream parser over libxml2's push parser.
///
/// Feed it bytes as they arrive, split anywhere; it returns each stanza once its end tag is in. It never
/// holds more than `maxStanzaBytes` of unfinished input. Not thread-safe: one per connection, used on
/// that connection's event loop. Call `reset()` at each stream restart (after STARTTLS and SASL).
public final class XMLStreamParser {
    private let state: ParserState
    private var context: xmlParserCtxtPtr?

    public init(limits: XMLStreamLimits = XMLStreamLimits()) {
        state = ParserState(limits: limits)
        context = nil
    }

    deinit {
        if let context { starling_release_push_parser(context) }
    }

    /// Starts a fresh document, as RFC 6120 requires after STARTTLS and SASL success.
    public func reset() {
        if let context { starling_release_push_parser(context) }
        context = nil
        state.reset()
    }

    /// Frees libxml2's state while the stream sits between stanzas with nothing unparsed, so an idle
    /// connection holds no parser memory. The next `feed` starts a new context and primes it with a copy
    /// of the stream header (same prefixes and namespaces), invisibly to the caller. Returns whether
    /// it released anything.
    @discardableResult
    public func releaseBetweenStanzas() -> Bool {
        guard let context, state.failure == nil, state.streamOpen, state.stack.isEmpty,
              state.resumeHeader != nil, Self.onlyWhitespaceUnparsed(context) else { return false }
        starling_release_push_parser(context)
        self.context = nil
        state.context = nil
        state.needsPriming = true
        return true
    }

    /// Parses `bytes` and appends the complete events to `events`.
    public func feed(_ bytes: UnsafeRawBufferPointer, into events: inout [XMLStreamEvent]) throws(XMLStreamError) {
        if let failure = state.failure { throw failure }
        if bytes.isEmpty { return }
        let ctx = try parserContext()
        let result = bytes.withMemoryRebound(to: CChar.self) { chars in
            xmlParseChunk(ctx, chars.baseAddress, Int32(chars.count), 0)
        }
        state.totalFed += bytes.count
        if events.isEmpty {
            // Hand the buffer over instead of copying: an idle connection then holds no event storage.
            swap(&events, &state.events)
        } else if !state.events.isEmpty {
            events.append(contentsOf: state.events)
            state.events.removeAll()
        }
        if let failure = state.failure { throw failure }
        if result != 0 {
            let failure = XMLStreamError.notWellFormed(Self.lastErrorMessage(ctx))
            state.failure = failure
            throw failure
        }
        if state.totalFed - state.boundary > state.limits.maxStanzaBytes {
            let failure = XMLStreamError.stanzaTooLarge(limit: state.limits.maxStanzaBytes)
            state.failure = failure
            throw failure
        }
    }

    /// Convenience for tests and clients: parses `bytes` and returns the events.
    public func feed(_ bytes: [UInt8]) throws(XMLStreamError) -> [XMLStreamEvent] {
        var events: [XMLStreamEvent] = []
        let failure: XMLStreamError? = bytes.withUnsafeBytes { buffer in
            do throws(XMLStreamError) { try feed(buffer, into: &events) } catch { return error }
            return nil
        }
        if let failure { throw failure }
        return events
    }

    public func feed(_ string: String) throws(XMLStreamError) -> [XMLStreamEvent] {
        try feed(Array(string.utf8))
    }

    /// libxml2 sets up its global state (locks included) lazily, and racily when two threads parse for
    /// the first time at once: it must be initialized once before any parsing, which this does.
    private static let libraryInitialized: Void = xmlInitParser()

    private func parserContext() throws(XMLStreamError) -> xmlParserCtxtPtr {
        if let context { return context }
        Self.libraryInitialized
        var handler = Self.saxHandler
        let userData = Unmanaged.passUnretained(state).toOpaque()
        guard let ctx = starling_create_push_parser(&handler, userData, Self.sharedDictionaryLimit) else {
            throw .notWellFormed("the XML parser could not be created")
        }
        // NOENT is safe here because DTDs are refused outright, so only the five predefined entities
        // exist; it makes libxml2 hand over decoded attribute values.
        let options = Int32(XML_PARSE_NONET.rawValue | XML_PARSE_NOENT.rawValue | XML_PARSE_NOCDATA.rawValue)
        xmlCtxtUseOptions(ctx, options)
        state.context = ctx
        context = ctx
        if state.needsPriming, let header = state.resumeHeader {
            state.needsPriming = false
            state.consumedBase = state.totalFed
            state.primingBytes = header.utf8.count
            state.priming = true
            var bytes = Array(header.utf8)
            _ = bytes.withUnsafeMutableBufferPointer { buffer in
                buffer.withMemoryRebound(to: CChar.self) { xmlParseChunk(ctx, $0.baseAddress, Int32($0.count), 0) }
            }
        }
        return ctx
    }

    /// libxml2 holds back whitespace after a stanza until it sees what follows; between stanzas that
    /// whitespace means nothing and may be dropped.
    private static func onlyWhitespaceUnparsed(_ ctx: xmlParserCtxtPtr) -> Bool {
        guard let input = ctx.pointee.input, var cursor = input.pointee.cur, let end = input.pointee.end else { return true }
        while cursor < end {
            switch cursor.pointee {
            case 0x20, 0x09, 0x0A, 0x0D: cursor += 1
            default: return false
            }
        }
        return true
    }

    /// Bytes of element and attribute names one event loop's parsers share before a new dictionary starts.
    private static let sharedDictionaryLimit = 1 << 20

    private static func lastErrorMessage(_ ctx: xmlParserCtxtPtr) -> String {
        guard let error = xmlCtxtGetLastError(ctx), let message = error.pointee.message else {
            return "malformed XML"
        }
        var text = String(cString: message)
        while text.last?.isWhitespace == true { text.removeLast() }
        return "\(text) (line \(error.pointee.line))"
    }

    private static let saxHandler: xmlSAXHandler = {
        var handler = xmlSAXHandler()
        handler.initialized = XML_SAX2_MAGIC
        handler.startElementNs = { ctx, localname, prefix, uri, nbNamespaces, namespaces, nbAttributes, _, attributes in
            ParserState.from(ctx).startElement(
                localname: localname, prefix: prefix, uri: uri,
                nbNamespaces: Int(nbNamespaces), namespaces: namespaces,
                nbAttributes: Int(nbAttributes), attributes: attributes
            )
        }
        handler.endElementNs = { ctx, _, _, _ in ParserState.from(ctx).endElement() }
        handler.characters = { ctx, chars, length in ParserState.from(ctx).characters(chars, Int(length)) }
        handler.cdataBlock = { ctx, chars, length in ParserState.from(ctx).characters(chars, Int(length)) }
        handler.internalSubset = { ctx, _, _, _ in ParserState.from(ctx).refuse("a document type declaration") }
        handler.externalSubset = { ctx, _, _, _ in ParserState.from(ctx).refuse("an external subset") }
        handler.entityDecl = { ctx, _, _, _, _, _ in ParserState.from(ctx).refuse("an entity declaration") }
        handler.unparsedEntityDecl = { ctx, _, _, _, _ in ParserState.from(ctx).refuse("an entity declaration") }
        handler.notationDecl = { ctx, _, _, _ in ParserState.from(ctx).refuse("a notation declaration") }
        handler.processingInstruction = { ctx, _, _ in ParserState.from(ctx).refuse("a processing instruction") }
        handler.comment = { ctx, _ in ParserState.from(ctx).refuse("a comment") }
        // A structured error handler keeps libxml2 from printing; the message is read from the context.
        handler.serror = { _, _ in }
        return handler
    }()
}

/// The per-stream parse state that libxml2's callbacks reach through their user-data pointer.
private final class ParserState {
    let limits: XMLStreamLimits
    var context: xmlParserCtxtPtr?
    var events: [XMLStreamEvent] = []
    var failure: XMLStreamError?
    /// Open elements below the stream element; the first is the stanza being built.
    var stack: [XMLElement] = []
    var streamOpen = false
    /// Bytes fed in total, and the position (in the same count) where the last stanza ended.
    var totalFed = 0
    var boundary = 0
    /// The stream's start tag with its namespace declarations, to prime a context after a release.
    var resumeHeader: String?
    var needsPriming = false
    /// The current context is parsing the copied header: its start tag is not an event.
    var priming = false
    /// `totalFed` when the current context started, and the bytes of copied header it was primed with.
    var consumedBase = 0
    var primingBytes = 0

    init(limits: XMLStreamLimits) { self.limits = limits }

    func reset() {
        context = nil
        events.removeAll()
        failure = nil
        stack.removeAll()
        streamOpen = false
        totalFed = 0
        boundary = 0
        resumeHeader = nil
        needsPriming = false
        priming = false
        consumedBase = 0
        primingBytes = 0
    }

    static func from(_ ctx: UnsafeMutableRawPointer?) -> ParserState {
        Unmanaged<ParserState>.fromOpaque(ctx!).takeUnretainedValue()
    }

    var consumed: Int {
        guard let context else { return totalFed }
        return consumedBase + Int(xmlByteConsumed(context)) - primingBytes
    }

    func stop(_ error: XMLStreamError) {
        if failure == nil { failure = error }
        if let context { xmlStopParser(context) }
    }

    func refuse(_ what: String) { stop(.restrictedXML("\(what) is not allowed in XMPP")) }

    func startElement(
        localname: UnsafePointer<xmlChar>?,
        prefix: UnsafePointer<xmlChar>?,
        uri: UnsafePointer<xmlChar>?,
        nbNamespaces: Int,
        namespaces: UnsafeMutablePointer<UnsafePointer<xmlChar>?>?,
        nbAttributes: Int,
        attributes: UnsafeMutablePointer<UnsafePointer<xmlChar>?>?
    ) {
        guard failure == nil else { return }
        if priming {
            priming = false
            return
        }
        if streamOpen && stack.count >= limits.maxDepth {
            stop(.tooDeep(limit: limits.maxDepth))
            return
        }
        var attributeList: [XMLAttribute] = []
        if nbAttributes > 0, let attributes {
            attributeList.reserveCapacity(nbAttributes)
            for index in 0..<nbAttributes {
                let base = attributes + index * 5
                guard let name = base[0], let valueStart = base[3], let valueEnd = base[4] else { continue }
                let value = String(decoding: UnsafeBufferPointer(start: valueStart, count: valueEnd - valueStart), as: UTF8.self)
                attributeList.append(XMLAttribute(
                    name: String(cString: name),
                    value: value,
                    prefix: base[1].map { String(cString: $0) },
                    namespace: base[2].map { String(cString: $0) }
                ))
            }
        }
        let element = XMLElement(
            name: String(cString: localname!),
            namespace: uri.map { String(cString: $0) } ?? "",
            prefix: prefix.map { String(cString: $0) },
            attributes: attributeList,
            children: []
        )
        if !streamOpen {
            var defaultNamespace: String?
            if nbNamespaces > 0, let namespaces {
                for index in 0..<nbNamespaces where namespaces[index * 2] == nil {
                    defaultNamespace = namespaces[index * 2 + 1].map { String(cString: $0) }
                }
            }
            streamOpen = true
            boundary = consumed
            resumeHeader = Self.startTag(localname: localname!, prefix: prefix, nbNamespaces: nbNamespaces, namespaces: namespaces)
            events.append(.streamOpen(header: element, defaultNamespace: defaultNamespace))
            return
        }
        var child = element
        // A default namespace is resolved into `namespace`; the prefix is only kept for prefixed names.
        if child.prefix != nil && child.namespace.isEmpty { child.prefix = nil }
        stack.append(child)
    }

    /// `<prefix:name xmlns...='...'>` as the client declared it.
    private static func startTag(localname: UnsafePointer<xmlChar>, prefix: UnsafePointer<xmlChar>?, nbNamespaces: Int,
                                 namespaces: UnsafeMutablePointer<UnsafePointer<xmlChar>?>?) -> String {
        var tag = "<"
        if let prefix { tag += String(cString: prefix) + ":" }
        tag += String(cString: localname)
        if let namespaces {
            for index in 0..<nbNamespaces {
                tag += namespaces[index * 2].map { " xmlns:" + String(cString: $0) + "='" } ?? " xmlns='"
                XMLElement.escapeAttribute(namespaces[index * 2 + 1].map { String(cString: $0) } ?? "", into: &tag)
                tag += "'"
            }
        }
        return tag + ">"
    }

    func endElement() {
        guard failure == nil else { return }
        guard let finished = stack.popLast() else {
            // The stream element itself closed.
            streamOpen = false
            events.append(.streamClose)
            return
        }
        if stack.isEmpty {
            let end = consumed
            if end - boundary > limits.maxStanzaBytes {
                stop(.stanzaTooLarge(limit: limits.maxStanzaBytes))
                return
            }
            boundary = end
            events.append(.stanza(finished))
        } else {
            stack[stack.count - 1].children.append(.element(finished))
        }
    }

    func characters(_ chars: UnsafePointer<xmlChar>?, _ length: Int) {
        guard failure == nil, let chars else { return }
        if stack.isEmpty {
            // Whitespace between stanzas (keepalives) counts as a completed unit.
            boundary = consumed
            return
        }
        let text = String(decoding: UnsafeBufferPointer(start: chars, count: length), as: UTF8.self)
        let top = stack.count - 1
        if case .text(let previous)? = stack[top].children.last {
            stack[top].children[stack[top].children.count - 1] = .text(previous + text)
        } else {
            stack[top].children.append(.text(text))
        }
    }
}

/// Parses one stored element (e.g. an offline message) as if it appeared inside a stream whose
/// default namespace is `defaultNamespace`.
public enum XMLFragmentParser {
    public static func parse(_ text: String, defaultNamespace: String = Namespace.client) -> XMLElement? {
        let parser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: max(text.utf8.count * 2, 1024), maxDepth: 64))
        var header = "<stream:stream xmlns='"
        XMLElement.escapeAttribute(defaultNamespace, into: &header)
        header += "' xmlns:stream='http://etherx.jabber.org/streams'>"
        guard let events = try? parser.feed(header + text) else { return nil }
        for case .stanza(let element) in events { return element }
        return nil
    }
}
