/// One BOSH session's request scheduling (XEP-0124, XEP-0206) as a plain state machine: requests,
/// output of the XMPP stream and timers in, actions out. `BOSHSession` carries the actions out.
///
/// Requests are processed in `rid` order (ones that arrive early wait for the missing ones, within the
/// window of `hold + 1`); each is held until there is something to send or `wait` seconds pass; more than
/// `hold` held requests answer the oldest at once; the last answers are kept so that a request sent again
/// (its connection died) gets the same answer; a session without any request for `inactivity` seconds ends.
struct BOSHSessionMachine {
    typealias RequestID = Int

    struct Settings: Sendable, Equatable {
        var wait: Int
        var hold: Int
        var inactivity: Int
        /// Bytes of stream output that may wait for the client to fetch them before the session ends.
        var maxPendingBytes: Int
    }

    /// What one request carries, as far as scheduling is concerned.
    struct Request: Equatable {
        var rid: Int64
        /// The payload elements, serialized, for the XMPP stream.
        var elements: [String]
        /// `xmpp:restart='true'` (XEP-0206 §5): a new stream header after SASL.
        var restart = false
        /// `type='terminate'`: the client ends the session (after its last elements).
        var terminate = false
    }

    enum Action: Equatable {
        /// Bytes for the XMPP stream.
        case forward(String)
        /// Answer a request with this `<body/>`.
        case respond(RequestID, String)
        /// Answer `RequestID` empty unless something comes before `seconds` pass.
        case startWait(RequestID, seconds: Int)
        /// Nothing is held: the session ends unless a request comes within `seconds`.
        case startInactivity(seconds: Int)
        case stopInactivity
        /// Close the XMPP stream's connection.
        case closeStream
        /// The session is over and answered: forget it.
        case forget
    }

    let settings: Settings
    /// The stream header sent at creation and at each restart.
    let streamHeader: String
    /// Attributes of the session creation response (XEP-0124 §7.1), set once the stream's header is known.
    var creationAttributes = ""
    private var answeredCreation = false
    private var nextRID: Int64
    private var parked: [Int64: (RequestID, Request)] = [:]
    private var held: [(id: RequestID, rid: Int64)] = []
    private var queue: [String] = []
    private var queuedBytes = 0
    /// The last answers by rid, for requests sent again.
    private var answers: [Int64: String] = [:]
    private(set) var ended = false
    /// How the session ended, for the next request when none was held then.
    private var finalAnswer: String?

    init(settings: Settings, streamHeader: String, firstRID: Int64) {
        self.settings = settings
        self.streamHeader = streamHeader
        self.nextRID = firstRID
    }

    static let namespace = "http://jabber.org/protocol/httpbind"

    static func body(_ payload: [String] = [], attributes: String = "") -> String {
        "<body xmlns='\(namespace)' xmlns:stream='http://etherx.jabber.org/streams'\(attributes)>\(payload.joined())</body>"
    }

    static func terminateBody(_ condition: String?, payload: [String] = []) -> String {
        body(payload, attributes: " type='terminate'" + (condition.map { " condition='\($0)'" } ?? ""))
    }

    // MARK: Events

    mutating func received(_ id: RequestID, _ request: Request) -> [Action] {
        if ended {
            let answer = finalAnswer ?? Self.terminateBody("item-not-found")
            finalAnswer = nil
            return [.respond(id, answer), .forget]
        }
        if request.rid < nextRID {
            // Sent again because its connection died: the same answer, or it takes the old one's place.
            if let answer = answers[request.rid] { return [.respond(id, answer)] }
            if let index = held.firstIndex(where: { $0.rid == request.rid }) {
                let previous = held[index].id
                held[index].id = id
                return [.respond(previous, Self.body()), .startWait(id, seconds: settings.wait)]
            }
            return terminate(id, "item-not-found")
        }
        if request.rid >= nextRID + Int64(settings.hold + 1) { return terminate(id, "item-not-found") }
        if request.rid > nextRID {
            parked[request.rid] = (id, request)
            return []
        }
        var actions = process(id, request)
        while !ended, let (parkedID, next) = parked.removeValue(forKey: nextRID) { actions += process(parkedID, next) }
        return actions
    }

    /// One element the XMPP stream sent towards the client.
    mutating func output(_ element: String) -> [Action] {
        if ended { return [] }
        queue.append(element)
        queuedBytes += element.utf8.count
        if queuedBytes > settings.maxPendingBytes {
            // The client does not fetch what it is sent: bounded memory ends the session.
            return endSession("policy-violation", streamClosed: false)
        }
        guard let oldest = held.first else { return [] }
        return answer(oldest.id)
    }

    /// A held request's `wait` is over.
    mutating func waitExpired(_ id: RequestID) -> [Action] {
        guard held.contains(where: { $0.id == id }) else { return [] }
        return answer(id)
    }

    /// No request came for `inactivity` seconds.
    mutating func inactivityExpired() -> [Action] {
        guard held.isEmpty else { return [] }
        if ended { return [.forget] }
        ended = true
        return [.closeStream, .forget]
    }

    /// The XMPP stream ended (the server closed it, after a stream error perhaps): queued output goes out
    /// with the termination.
    mutating func streamClosed(error: Bool) -> [Action] {
        if ended { return [] }
        return endSession(error ? "remote-stream-error" : nil, streamClosed: true)
    }

    // MARK: Helpers

    private mutating func process(_ id: RequestID, _ request: Request) -> [Action] {
        nextRID = request.rid + 1
        var actions: [Action] = request.elements.map { .forward($0) }
        if request.restart { actions.append(.forward(streamHeader)) }
        if request.terminate {
            actions.append(.forward("</stream:stream>"))
            ended = true
            for entry in held { actions.append(.respond(entry.id, Self.body())) }
            held.removeAll()
            actions.append(.respond(id, Self.terminateBody(nil, payload: queue)))
            queue.removeAll()
            return actions + [.closeStream, .forget]
        }
        if held.isEmpty { actions.append(.stopInactivity) }
        held.append((id, request.rid))
        if !queue.isEmpty { actions += answer(held[0].id) }
        while held.count > settings.hold { actions += answer(held[0].id) }
        if held.contains(where: { $0.id == id }) { actions.append(.startWait(id, seconds: settings.wait)) }
        return actions
    }

    /// Answers a held request with everything queued.
    private mutating func answer(_ id: RequestID) -> [Action] {
        guard let index = held.firstIndex(where: { $0.id == id }) else { return [] }
        let rid = held.remove(at: index).rid
        var attributes = ""
        if !answeredCreation {
            answeredCreation = true
            attributes = creationAttributes
        }
        let text = Self.body(queue, attributes: attributes)
        queue.removeAll()
        queuedBytes = 0
        answers[rid] = text
        answers[rid - Int64(settings.hold + 1)] = nil
        var actions: [Action] = [.respond(id, text)]
        if held.isEmpty { actions.append(.startInactivity(seconds: settings.inactivity)) }
        return actions
    }

    private mutating func terminate(_ id: RequestID, _ condition: String) -> [Action] {
        held.append((id, nextRID))
        return endSession(condition, streamClosed: false)
    }

    /// Ends the session; what was queued (a stream error, say) goes with the termination, to a held
    /// request or else to the next one.
    private mutating func endSession(_ condition: String?, streamClosed: Bool) -> [Action] {
        ended = true
        var actions: [Action] = streamClosed ? [] : [.forward("</stream:stream>")]
        var final: String? = Self.terminateBody(condition, payload: queue)
        queue.removeAll()
        for entry in held {
            actions.append(.respond(entry.id, final ?? Self.terminateBody(condition)))
            final = nil
        }
        // Closing may report the stream's end at once: every answer is given before.
        actions.append(.closeStream)
        if held.isEmpty {
            finalAnswer = final
            return actions + [.startInactivity(seconds: settings.inactivity)]
        }
        held.removeAll()
        return actions + [.forget]
    }
}
