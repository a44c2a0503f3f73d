import NIOConcurrencyHelpers
import StarlingAPI
import StarlingCluster
import StarlingXML

/// XEP-0198's counting for one stream, as a plain value: what the client handled (what `<a h/>` says),
/// what was sent to it, and what it has not acknowledged yet (resent on resumption). Counters wrap at
/// 2^32 as the XEP says.
struct StreamManagement {
    static let namespace = "urn:xmpp:sm:3"

    private(set) var enabled = false
    private(set) var resumable = false
    /// The resumption id, once enabled with resumption.
    private(set) var id: String?
    /// Stanzas handled from the client since enabling.
    private(set) var handled: UInt32 = 0
    /// Stanzas sent to the client since enabling (set directly only by tests of the wrap-around).
    var sent: UInt32 = 0
    /// Sent and not yet acknowledged, oldest first.
    private(set) var unacknowledged: [OutgoingStanza] = []
    /// An `<r/>` of ours awaits its `<a/>`.
    var requestOutstanding = false

    /// A session another node of the cluster handed over: counting goes on where it stopped there.
    init(resuming moved: MovedSession, id: String) {
        enabled = true
        resumable = true
        self.id = id
        handled = moved.handled
        sent = moved.sent
        unacknowledged = moved.unacknowledged.map { .element($0) }
    }

    init() {}

    mutating func enable(resumable: Bool) {
        enabled = true
        self.resumable = resumable
    }

    /// What a bound stream does about a stream management element from its client.
    enum Answer: Equatable {
        case send(XMLElement)
        case streamError(StreamErrorCondition, String)
        case nothing
    }

    /// `<enable/>`, `<r/>` or `<a/>` from a bound client. `resumeTimeout` is nil where the module is not
    /// enabled on the host (and 0 where resumption is off); `newID` makes a resumption id.
    mutating func received(_ element: XMLElement, resumeTimeout: Int?, newID: () -> String) -> Answer {
        switch element.name {
        case "enable":
            guard let resumeTimeout else { return .send(Self.failed(.featureNotImplemented)) }
            guard !enabled else { return .send(Self.failed(.unexpectedRequest)) }
            let resume = (element[attribute: "resume"] == "true" || element[attribute: "resume"] == "1") && resumeTimeout > 0
            enable(resumable: resume)
            var attributes: [String: String] = [:]
            if resume {
                let id = newID()
                self.id = id
                attributes = ["id": id, "resume": "true", "max": String(resumeTimeout)]
            }
            return .send(XMLElement(name: "enabled", namespace: Self.namespace, attributes: attributes))
        case "r" where enabled:
            return .send(XMLElement(name: "a", namespace: Self.namespace, attributes: ["h": String(handled)]))
        case "a" where enabled:
            guard let h = element[attribute: "h"].flatMap({ UInt32($0) }), acknowledge(h) else {
                return .streamError(.undefinedCondition, "that acknowledges stanzas never sent")
            }
            return .nothing
        default:
            return .streamError(.unsupportedStanzaType, "<\(element.name) xmlns='\(Self.namespace)'/> is not expected now")
        }
    }

    /// XEP-0198's `<failed/>` with a stanza error condition.
    static func failed(_ condition: StanzaErrorCondition) -> XMLElement {
        var failed = XMLElement(name: "failed", namespace: namespace)
        failed.append(XMLElement(name: condition.rawValue, namespace: Namespace.stanzaErrors))
        return failed
    }

    mutating func received() {
        if enabled { handled &+= 1 }
    }

    /// Counts a stanza on its way to the client; false once more are unacknowledged than `limit`.
    mutating func sending(_ stanza: OutgoingStanza, limit: Int) -> Bool {
        guard enabled else { return true }
        sent &+= 1
        unacknowledged.append(stanza)
        return unacknowledged.count <= limit
    }

    /// The client says it handled `h` stanzas in all: those are forgotten. False when `h` counts
    /// stanzas never sent (XEP-0198 §4: an `<undefined-condition/>` stream error).
    mutating func acknowledge(_ h: UInt32) -> Bool {
        let firstUnacknowledged = sent &- UInt32(unacknowledged.count)
        let confirmed = h &- firstUnacknowledged
        guard confirmed <= UInt32(unacknowledged.count) else { return false }
        unacknowledged.removeFirst(Int(confirmed))
        requestOutstanding = false
        return true
    }
}

// A stream's counting moves between event loops once, when a resuming connection takes it over; one
// loop owns it at a time.
extension StreamManagement: @unchecked Sendable {}

/// Sessions whose connection dropped while resumable (XEP-0198 §5), by stream id, until they are
/// resumed or time out. Each entry is the detached handler's way of handing itself over.
final class DetachedSessions: Sendable {
    /// Hands a detached session to the resuming connection: called once, from any thread; `completion`
    /// gets the stream's counting, or nil when it timed out meanwhile.
    typealias HandOver = @Sendable (_ newSession: ClientSession, _ completion: @escaping @Sendable (StreamManagement?) -> Void) -> Void
    /// Hands a detached session to another node: it unbinds here and `completion` gets what that node
    /// needs (nil when it timed out meanwhile).
    typealias MoveAway = @Sendable (_ completion: @escaping @Sendable (MovedSession?) -> Void) -> Void
    typealias Entry = (jid: JID, handOver: HandOver, moveAway: MoveAway)

    private let entries = NIOLockedValueBox<[String: Entry]>([:])

    func insert(_ id: String, jid: JID, handOver: @escaping HandOver, moveAway: @escaping MoveAway) {
        entries.withLockedValue { $0[id] = (jid, handOver, moveAway) }
    }

    /// Takes the session `id` if `user` (a bare JID) owns it; a stranger's or unknown id takes nothing.
    func take(_ id: String, user: JID) -> Entry? {
        entries.withLockedValue { entries in
            guard let entry = entries[id], entry.jid.bare == user.bare else { return nil }
            entries[id] = nil
            return entry
        }
    }

    func remove(_ id: String) {
        _ = entries.withLockedValue { $0.removeValue(forKey: id) }
    }

    /// Sessions waiting to be resumed now.
    var count: Int { entries.withLockedValue { $0.count } }
}

/// Resumptions waiting for another node to hand a detached session over, by request number.
final class RemoteResumptions: Sendable {
    typealias Completion = @Sendable (MovedSession?) -> Void
    private let state = NIOLockedValueBox<(next: UInt64, waiting: [UInt64: Completion])>((1, [:]))

    /// Files `completion` under a new request number.
    func register(_ completion: @escaping Completion) -> UInt64 {
        state.withLockedValue { state in
            let request = state.next
            state.next += 1
            state.waiting[request] = completion
            return request
        }
    }

    /// Completes the request once (the answer, or nil when it timed out or the link went away).
    func complete(_ request: UInt64, _ moved: MovedSession?) {
        let completion = state.withLockedValue { $0.waiting.removeValue(forKey: request) }
        completion?(moved)
    }
}

/// XEP-0198 resumption ids in a cluster end with the node that holds the session, so another node knows
/// whom to ask.
enum ResumptionID {
    static func make(random: String, node: String?) -> String {
        node.map { "\(random).\($0)" } ?? random
    }

    /// The node named in `id`, if any.
    static func node(of id: String) -> String? {
        guard let dot = id.firstIndex(of: ".") else { return nil }
        let node = id[id.index(after: dot)...]
        return node.isEmpty ? nil : String(node)
    }
}
