import NIOCore
import StarlingAPI
import StarlingXML

/// A stanza on its way to one session: its element, or a serialization shared by many recipients with
/// each one's address spliced in (a room's message to its occupants is serialized once, not once each).
enum OutgoingStanza {
    case element(XMLElement)
    /// Written with the receiving session's own address as `to`.
    case addressed(SharedSerialization)

    /// `message`, `presence` or `iq`.
    var name: String {
        switch self {
        case .element(let element): return element.name
        case .addressed(let shared): return shared.name
        }
    }
}

/// A stanza serialized once without its `to`: each recipient's copy is the two halves around ` to='…'`.
final class SharedSerialization: @unchecked Sendable {
    private let head: String
    private let tail: String
    let name: String

    init(_ stanza: XMLElement) {
        name = stanza.name
        var stanza = stanza
        stanza[attribute: "to"] = nil
        let text = stanza.serialized(inheritedNamespace: Namespace.client)
        // "<" and the qualified name come first; the attributes follow.
        let nameLength = 1 + stanza.name.utf8.count + (stanza.prefix.map { $0.utf8.count + 1 } ?? 0)
        let split = text.utf8.index(text.utf8.startIndex, offsetBy: nameLength)
        head = String(text[..<split])
        tail = String(text[split...])
    }

    /// `address` must already be escaped for an attribute value (see `escaped(_:)`); `declaringNamespace`
    /// for a stanza that is a document of its own (WebSocket).
    func write(to address: String, declaringNamespace: Bool = false, into buffer: inout ByteBuffer) {
        buffer.reserveCapacity(minimumWritableBytes: head.utf8.count + tail.utf8.count + address.utf8.count + 30)
        buffer.writeString(head)
        if declaringNamespace { buffer.writeString(" xmlns='\(Namespace.client)'") }
        buffer.writeString(" to='")
        buffer.writeString(address)
        buffer.writeString("'")
        buffer.writeString(tail)
    }

    var approximateSize: Int { head.utf8.count + tail.utf8.count + 64 }

    /// The stanza as an element again, addressed to `jid` (for the rare paths that store it).
    func element(to jid: JID) -> XMLElement? {
        var buffer = ByteBufferAllocator().buffer(capacity: approximateSize)
        write(to: Self.escaped(jid), into: &buffer)
        return XMLFragmentParser.parse(String(buffer: buffer))
    }

    static func escaped(_ jid: JID) -> String {
        var out = ""
        XMLElement.escapeAttribute(jid.description, into: &out)
        return out
    }
}
