import NIOCore
import StarlingAPI

/// One bound resource in the replicated session table, as its node announces it.
public struct ClusterSession: Sendable, Equatable {
    public var jid: JID
    /// Microseconds since the epoch when it was bound: when two nodes bind the same full JID, the later
    /// binding wins on every node alike.
    public var boundAt: UInt64
    public var priority: Int
    /// The last available presence; nil while unavailable.
    public var presence: XMLElement?
    public var flags: Set<String>

    public init(jid: JID, boundAt: UInt64, priority: Int, presence: XMLElement?, flags: Set<String>) {
        self.jid = jid
        self.boundAt = boundAt
        self.priority = priority
        self.presence = presence
        self.flags = flags
    }

    public var available: Bool { presence != nil }
}

/// A stream-management session (XEP-0198) leaving the node that held it, detached, for the node its client
/// came back to: what the new node needs to resume it there.
public struct MovedSession: Sendable, Equatable {
    public var jid: JID
    /// Stanzas the session handled from its client, and sent to it (XEP-0198's counters).
    public var handled: UInt32
    public var sent: UInt32
    /// What the client has not acknowledged, oldest first: sent again on resumption.
    public var unacknowledged: [XMLElement]
    /// The session's last available presence (nil: unavailable) and its modules' flags.
    public var presence: XMLElement?
    public var flags: Set<String>
    /// What modules carry over for the session (`SessionHandoverEvent`), one element each.
    public var carried: [XMLElement]

    public init(jid: JID, handled: UInt32, sent: UInt32, unacknowledged: [XMLElement], presence: XMLElement?, flags: Set<String>,
                carried: [XMLElement] = []) {
        self.jid = jid
        self.handled = handled
        self.sent = sent
        self.unacknowledged = unacknowledged
        self.presence = presence
        self.flags = flags
        self.carried = carried
    }
}

/// What crosses a node link. Stanzas travel as trees in a binary form, so the receiving node does not
/// parse XML again.
public enum ClusterFrame: Sendable, Equatable {
    /// First frame each way: versions must match, and the nonce is what the other side's proof covers.
    case hello(version: Int, cluster: String, node: String, nonce: [UInt8])
    /// HMAC-SHA-256 over both nonces, both names and the link's TLS certificate, keyed with the secret.
    case proof([UInt8])
    /// The sender's whole table of local sessions follows (it replaces what the receiver held for it).
    case snapshotBegin
    case sessions([ClusterSession])
    case snapshotEnd
    /// A session bound, or its presence or flags changed.
    case session(ClusterSession)
    case unbound(JID, boundAt: UInt64)
    /// A stanza for sessions bound on the receiving node. `addressed`: each copy gets the recipient's
    /// full JID as `to` (a room's fan-out); otherwise the stanza goes as it is.
    case deliver(XMLElement, recipients: [JID], addressed: Bool)
    /// The sender serves this component domain from now on (`claimedAt`: µs since the epoch; of two
    /// claims the earlier wins, then the smaller node name).
    case claim(String, claimedAt: UInt64)
    /// A stanza for a component domain the receiving node serves.
    case component(XMLElement, from: JID, to: JID)
    case ping(UInt64)
    case pong(UInt64)
    /// Close a session bound on the receiving node with this stream error condition (its account was
    /// deleted on the sending node, say).
    case closeSession(JID, condition: String)
    /// A module's message to the same host's modules on the receiving node.
    case module(host: String, XMLElement)
    /// The sender is leaving (graceful shutdown): drop its sessions and claims now, not after `deadAfter`.
    case goodbye
    /// A client of `user` wants to resume the detached session `id` on the sender: hand it over.
    case resumeRequest(id: String, user: JID, request: UInt64)
    /// The answer to `resumeRequest` `request`: the session, now gone from the sender, or nil (no such
    /// session of that account there any more).
    case resumeState(request: UInt64, MovedSession?)
}

public struct ClusterWireError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

extension ClusterFrame {
    /// The version of this wire format; nodes of another version refuse to link.
    public static let wireVersion = 3
    /// Frames larger than this end the link: a stanza is at most 16 MiB (`limits.max_stanza_size`), and a
    /// snapshot is sent in chunks.
    public static let maxFrameSize = 32 << 20

    private enum Tag: UInt8 {
        case hello = 1, proof, snapshotBegin, sessions, snapshotEnd, session, unbound, deliver, ping, pong, claim, component, goodbye, module, closeSession
        case resumeRequest, resumeState
    }

    /// Appends the frame, with its 4-byte length prefix, to `buffer`.
    public func encode(into buffer: inout ByteBuffer) {
        let lengthIndex = buffer.writerIndex
        buffer.writeInteger(UInt32(0))
        switch self {
        case .hello(let version, let cluster, let node, let nonce):
            buffer.writeInteger(Tag.hello.rawValue)
            buffer.writeInteger(UInt16(version))
            buffer.writeWireString(cluster)
            buffer.writeWireString(node)
            buffer.writeWireBytes(nonce)
        case .proof(let mac):
            buffer.writeInteger(Tag.proof.rawValue)
            buffer.writeWireBytes(mac)
        case .snapshotBegin:
            buffer.writeInteger(Tag.snapshotBegin.rawValue)
        case .sessions(let sessions):
            buffer.writeInteger(Tag.sessions.rawValue)
            buffer.writeInteger(UInt32(sessions.count))
            for session in sessions { buffer.writeSession(session) }
        case .snapshotEnd:
            buffer.writeInteger(Tag.snapshotEnd.rawValue)
        case .session(let session):
            buffer.writeInteger(Tag.session.rawValue)
            buffer.writeSession(session)
        case .unbound(let jid, let boundAt):
            buffer.writeInteger(Tag.unbound.rawValue)
            buffer.writeWireString(jid.description)
            buffer.writeInteger(boundAt)
        case .deliver(let stanza, let recipients, let addressed):
            buffer.writeInteger(Tag.deliver.rawValue)
            buffer.writeInteger(UInt8(addressed ? 1 : 0))
            buffer.writeInteger(UInt32(recipients.count))
            for recipient in recipients { buffer.writeWireString(recipient.description) }
            buffer.writeElement(stanza)
        case .claim(let domain, let claimedAt):
            buffer.writeInteger(Tag.claim.rawValue)
            buffer.writeWireString(domain)
            buffer.writeInteger(claimedAt)
        case .component(let stanza, let from, let to):
            buffer.writeInteger(Tag.component.rawValue)
            buffer.writeWireString(from.description)
            buffer.writeWireString(to.description)
            buffer.writeElement(stanza)
        case .goodbye:
            buffer.writeInteger(Tag.goodbye.rawValue)
        case .closeSession(let jid, let condition):
            buffer.writeInteger(Tag.closeSession.rawValue)
            buffer.writeWireString(jid.description)
            buffer.writeWireString(condition)
        case .module(let host, let message):
            buffer.writeInteger(Tag.module.rawValue)
            buffer.writeWireString(host)
            buffer.writeElement(message)
        case .resumeRequest(let id, let user, let request):
            buffer.writeInteger(Tag.resumeRequest.rawValue)
            buffer.writeWireString(id)
            buffer.writeWireString(user.description)
            buffer.writeInteger(request)
        case .resumeState(let request, let moved):
            buffer.writeInteger(Tag.resumeState.rawValue)
            buffer.writeInteger(request)
            guard let moved else {
                buffer.writeInteger(UInt8(0))
                break
            }
            buffer.writeInteger(UInt8(1))
            buffer.writeWireString(moved.jid.description)
            buffer.writeInteger(moved.handled)
            buffer.writeInteger(moved.sent)
            buffer.writeInteger(UInt32(moved.unacknowledged.count))
            for stanza in moved.unacknowledged { buffer.writeElement(stanza) }
            buffer.writeInteger(UInt16(moved.flags.count))
            for flag in moved.flags.sorted() { buffer.writeWireString(flag) }
            if let presence = moved.presence {
                buffer.writeInteger(UInt8(1))
                buffer.writeElement(presence)
            } else {
                buffer.writeInteger(UInt8(0))
            }
            buffer.writeInteger(UInt32(moved.carried.count))
            for element in moved.carried { buffer.writeElement(element) }
        case .ping(let value):
            buffer.writeInteger(Tag.ping.rawValue)
            buffer.writeInteger(value)
        case .pong(let value):
            buffer.writeInteger(Tag.pong.rawValue)
            buffer.writeInteger(value)
        }
        buffer.setInteger(UInt32(buffer.writerIndex - lengthIndex - 4), at: lengthIndex)
    }

    /// Reads one frame's body (without its length prefix). Anything malformed is an error: the link ends.
    public static func decode(_ body: inout ByteBuffer) throws -> ClusterFrame {
        guard let raw: UInt8 = body.readInteger(), let tag = Tag(rawValue: raw) else { throw ClusterWireError("unknown frame type") }
        let frame: ClusterFrame
        switch tag {
        case .hello:
            guard let version: UInt16 = body.readInteger() else { throw ClusterWireError("short hello") }
            frame = .hello(version: Int(version), cluster: try body.readWireString(), node: try body.readWireString(), nonce: try body.readWireBytes())
        case .proof:
            frame = .proof(try body.readWireBytes())
        case .snapshotBegin:
            frame = .snapshotBegin
        case .sessions:
            let count = try body.readCount()
            var sessions: [ClusterSession] = []
            sessions.reserveCapacity(count)
            for _ in 0..<count { sessions.append(try body.readSession()) }
            frame = .sessions(sessions)
        case .snapshotEnd:
            frame = .snapshotEnd
        case .session:
            frame = .session(try body.readSession())
        case .unbound:
            let jid = try body.readJID()
            guard let boundAt: UInt64 = body.readInteger() else { throw ClusterWireError("short unbound") }
            frame = .unbound(jid, boundAt: boundAt)
        case .deliver:
            guard let addressed: UInt8 = body.readInteger() else { throw ClusterWireError("short deliver") }
            let count = try body.readCount()
            var recipients: [JID] = []
            recipients.reserveCapacity(count)
            for _ in 0..<count { recipients.append(try body.readJID()) }
            frame = .deliver(try body.readElement(depth: 0), recipients: recipients, addressed: addressed == 1)
        case .claim:
            let domain = try body.readWireString()
            guard let claimedAt: UInt64 = body.readInteger() else { throw ClusterWireError("short claim") }
            frame = .claim(domain, claimedAt: claimedAt)
        case .component:
            let from = try body.readJID()
            let to = try body.readJID()
            frame = .component(try body.readElement(depth: 0), from: from, to: to)
        case .goodbye:
            frame = .goodbye
        case .closeSession:
            let jid = try body.readJID()
            frame = .closeSession(jid, condition: try body.readWireString())
        case .module:
            let host = try body.readWireString()
            frame = .module(host: host, try body.readElement(depth: 0))
        case .resumeRequest:
            let id = try body.readWireString()
            let user = try body.readJID()
            guard let request: UInt64 = body.readInteger() else { throw ClusterWireError("short resume request") }
            frame = .resumeRequest(id: id, user: user, request: request)
        case .resumeState:
            guard let request: UInt64 = body.readInteger(), let present: UInt8 = body.readInteger() else { throw ClusterWireError("short resume state") }
            guard present == 1 else {
                frame = .resumeState(request: request, nil)
                break
            }
            let jid = try body.readJID()
            guard jid.resourcepart != nil, let handled: UInt32 = body.readInteger(), let sent: UInt32 = body.readInteger() else {
                throw ClusterWireError("short resume state")
            }
            let count = try body.readCount()
            var unacknowledged: [XMLElement] = []
            for _ in 0..<count { unacknowledged.append(try body.readElement(depth: 0)) }
            guard let flagCount: UInt16 = body.readInteger() else { throw ClusterWireError("short resume state") }
            var flags = Set<String>()
            for _ in 0..<flagCount { flags.insert(try body.readWireString()) }
            guard let hasPresence: UInt8 = body.readInteger() else { throw ClusterWireError("short resume state") }
            let presence = hasPresence == 1 ? try body.readElement(depth: 0) : nil
            let carriedCount = try body.readCount()
            var carried: [XMLElement] = []
            for _ in 0..<carriedCount { carried.append(try body.readElement(depth: 0)) }
            frame = .resumeState(request: request, MovedSession(jid: jid, handled: handled, sent: sent, unacknowledged: unacknowledged,
                                                                presence: presence, flags: flags, carried: carried))
        case .ping, .pong:
            guard let value: UInt64 = body.readInteger() else { throw ClusterWireError("short ping") }
            frame = tag == .ping ? .ping(value) : .pong(value)
        }
        guard body.readableBytes == 0 else { throw ClusterWireError("trailing bytes in a frame") }
        return frame
    }
}

extension ByteBuffer {
    mutating func writeWireString(_ string: String) {
        let lengthIndex = writerIndex
        writeInteger(UInt32(0))
        let written = writeString(string)
        setInteger(UInt32(written), at: lengthIndex)
    }

    mutating func writeWireBytes(_ bytes: [UInt8]) {
        writeInteger(UInt32(bytes.count))
        writeBytes(bytes)
    }

    mutating func writeOptionalWireString(_ string: String?) {
        if let string {
            writeInteger(UInt8(1))
            writeWireString(string)
        } else {
            writeInteger(UInt8(0))
        }
    }

    mutating func readCount() throws -> Int {
        guard let count: UInt32 = readInteger(), Int(count) <= readableBytes else { throw ClusterWireError("bad count") }
        return Int(count)
    }

    mutating func readWireString() throws -> String {
        let length = try readCount()
        guard let string = readString(length: length) else { throw ClusterWireError("short string") }
        return string
    }

    mutating func readWireBytes() throws -> [UInt8] {
        let length = try readCount()
        guard let bytes = readBytes(length: length) else { throw ClusterWireError("short bytes") }
        return bytes
    }

    mutating func readOptionalWireString() throws -> String? {
        guard let present: UInt8 = readInteger() else { throw ClusterWireError("short optional") }
        return present == 1 ? try readWireString() : nil
    }

    mutating func readJID() throws -> JID {
        let text = try readWireString()
        guard let jid = JID(text) else { throw ClusterWireError("invalid JID '\(text)'") }
        return jid
    }

    mutating func writeSession(_ session: ClusterSession) {
        writeWireString(session.jid.description)
        writeInteger(session.boundAt)
        writeInteger(Int16(session.priority))
        writeInteger(UInt16(session.flags.count))
        for flag in session.flags.sorted() { writeWireString(flag) }
        if let presence = session.presence {
            writeInteger(UInt8(1))
            writeElement(presence)
        } else {
            writeInteger(UInt8(0))
        }
    }

    mutating func readSession() throws -> ClusterSession {
        let jid = try readJID()
        guard jid.resourcepart != nil, let boundAt: UInt64 = readInteger(), let priority: Int16 = readInteger(),
              let flagCount: UInt16 = readInteger() else { throw ClusterWireError("short session") }
        var flags = Set<String>()
        for _ in 0..<flagCount { flags.insert(try readWireString()) }
        guard let hasPresence: UInt8 = readInteger() else { throw ClusterWireError("short session") }
        let presence = hasPresence == 1 ? try readElement(depth: 0) : nil
        return ClusterSession(jid: jid, boundAt: boundAt, priority: Int(priority), presence: presence, flags: flags)
    }

    /// The tree as it is: name, namespace, prefix, attributes, then children (text or elements).
    mutating func writeElement(_ element: XMLElement) {
        writeWireString(element.name)
        writeWireString(element.namespace)
        writeOptionalWireString(element.prefix)
        writeInteger(UInt32(element.attributes.count))
        for attribute in element.attributes {
            writeWireString(attribute.name)
            writeOptionalWireString(attribute.prefix)
            writeOptionalWireString(attribute.namespace)
            writeWireString(attribute.value)
        }
        writeInteger(UInt32(element.children.count))
        for child in element.children {
            switch child {
            case .element(let nested):
                writeInteger(UInt8(0))
                writeElement(nested)
            case .text(let text):
                writeInteger(UInt8(1))
                writeWireString(text)
            }
        }
    }

    /// Nesting is bounded like a client's stanza (a peer is trusted, a corrupted frame is not).
    mutating func readElement(depth: Int) throws -> XMLElement {
        guard depth < 256 else { throw ClusterWireError("element nested too deeply") }
        let name = try readWireString()
        let namespace = try readWireString()
        let prefix = try readOptionalWireString()
        let attributeCount = try readCount()
        var attributes: [XMLAttribute] = []
        attributes.reserveCapacity(attributeCount)
        for _ in 0..<attributeCount {
            let attributeName = try readWireString()
            let attributePrefix = try readOptionalWireString()
            let attributeNamespace = try readOptionalWireString()
            attributes.append(XMLAttribute(name: attributeName, value: try readWireString(), prefix: attributePrefix, namespace: attributeNamespace))
        }
        let childCount = try readCount()
        var children: [XMLNode] = []
        children.reserveCapacity(childCount)
        for _ in 0..<childCount {
            guard let kind: UInt8 = readInteger() else { throw ClusterWireError("short element") }
            switch kind {
            case 0: children.append(.element(try readElement(depth: depth + 1)))
            case 1: children.append(.text(try readWireString()))
            default: throw ClusterWireError("unknown node kind \(kind)")
            }
        }
        return XMLElement(name: name, namespace: namespace, prefix: prefix, attributes: attributes, children: children)
    }
}

/// Splits the link's byte stream into frame bodies.
public struct ClusterFrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = ClusterFrame

    public init() {}

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length: UInt32 = buffer.getInteger(at: buffer.readerIndex) else { return .needMoreData }
        guard Int(length) <= ClusterFrame.maxFrameSize, length > 0 else { throw ClusterWireError("frame of \(length) bytes") }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        var body = buffer.readSlice(length: Int(length))!
        context.fireChannelRead(Self.wrapInboundOut(try ClusterFrame.decode(&body)))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }
}
