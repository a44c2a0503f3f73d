import NIOConcurrencyHelpers
import NIOCore
import StarlingAPI
import Synchronization

/// A bound client session as the rest of the server sees it. Deliveries may come from any thread; the
/// session hops to its own event loop before touching its channel.
public final class ClientSession: @unchecked Sendable, Hashable {
    public let jid: JID
    /// `jid` as an attribute value, for stanzas serialized once for many sessions.
    let escapedAddress: String
    public let eventLoop: any EventLoop
    /// Called on `eventLoop` only. Delivering writes at once and flushes at the end of the loop's
    /// current tick, so stanzas for one session that arrive together leave in one write.
    private let deliverOnLoop: (OutgoingStanza) -> Void
    private let closeOnLoop: (StreamErrorCondition) -> Void
    /// Called on `eventLoop` only: true adds a hold on reading from the client, false removes one.
    private let holdOnLoop: (Bool) -> Void

    init(jid: JID, eventLoop: any EventLoop, deliver: @escaping (OutgoingStanza) -> Void, close: @escaping (StreamErrorCondition) -> Void,
         hold: @escaping (Bool) -> Void) {
        self.jid = jid
        escapedAddress = SharedSerialization.escaped(jid)
        self.eventLoop = eventLoop
        self.deliverOnLoop = deliver
        self.closeOnLoop = close
        self.holdOnLoop = hold
    }

    /// Stops reading from the client until the hold (and any other) is released.
    func holdReads() -> any ReadHold {
        eventLoop.execute { self.holdOnLoop(true) }
        return Hold(session: self)
    }

    private final class Hold: ReadHold {
        let session: ClientSession
        let released = Atomic<Bool>(false)

        init(session: ClientSession) { self.session = session }

        func release() {
            guard !released.exchange(true, ordering: .relaxed) else { return }
            session.eventLoop.execute { self.session.holdOnLoop(false) }
        }
    }

    /// Writes `stanza` to this client.
    public func deliver(_ stanza: XMLElement) {
        deliver(.element(stanza))
    }

    func deliver(_ outgoing: OutgoingStanza) {
        if eventLoop.inEventLoop {
            deliverOnLoop(outgoing)
        } else {
            eventLoop.execute { self.deliverOnLoop(outgoing) }
        }
    }

    /// Delivers many stanzas to many sessions with one hop per event loop rather than one per stanza.
    static func deliver(_ batch: [(session: ClientSession, stanza: OutgoingStanza)]) {
        var groups: [(loop: any EventLoop, items: [(session: ClientSession, stanza: OutgoingStanza)])] = []
        for item in batch {
            if let index = groups.firstIndex(where: { $0.loop === item.session.eventLoop }) {
                groups[index].items.append(item)
            } else {
                groups.append((item.session.eventLoop, [item]))
            }
        }
        for group in groups {
            if group.loop.inEventLoop {
                for item in group.items { item.session.deliverOnLoop(item.stanza) }
                continue
            }
            let items = group.items
            group.loop.execute {
                for item in items { item.session.deliverOnLoop(item.stanza) }
            }
        }
    }

    /// Ends the session with a stream error (e.g. `<conflict/>` when replaced).
    public func close(_ condition: StreamErrorCondition) {
        eventLoop.execute { self.closeOnLoop(condition) }
    }

    public static func == (lhs: ClientSession, rhs: ClientSession) -> Bool { lhs === rhs }
    public func hash(into hasher: inout Hasher) { hasher.combine(ObjectIdentifier(self)) }
}

/// Where a stanza for a full JID goes. `remote` is the seam clustering fills in: the registry of a
/// clustered node will answer with the node that holds the session.
public enum SessionLocation: Sendable {
    case local(ClientSession)
    case remote(node: String)
}

/// The presence-relevant state of one resource, as routing needs it.
public struct ResourceState: Sendable {
    public var session: ClientSession
    /// Sent available presence (RFC 6121 §4.2) and not since unavailable.
    public var available: Bool
    public var priority: Int
}

/// Every bound resource on this node, sharded by bare JID so sessions on different event loops rarely
/// meet on the same lock, and never hold it longer than a dictionary operation.
public final class SessionRegistry: Sendable {
    private static let shardCount = 64
    private let shards: [NIOLockedValueBox<[JID: [String: ResourceState]]>]

    public init() {
        shards = (0..<Self.shardCount).map { _ in NIOLockedValueBox([:]) }
    }

    private func shard(_ bare: JID) -> NIOLockedValueBox<[JID: [String: ResourceState]]> {
        shards[Int(UInt(bitPattern: bare.hashValue) % UInt(Self.shardCount))]
    }

    public enum BindOutcome {
        case bound(JID, replaced: ClientSession?)
        case failed(StanzaErrorCondition)
    }

    /// Binds `resource` (or a generated one) for `user`. A resource already bound is taken over and the
    /// old session returned so the caller can close it with `<conflict/>` (RFC 6120 §7.7.2.2).
    public func bind(user: JID, resource requested: String?, maxSessions: Int, makeSession: (JID) -> ClientSession) -> BindOutcome {
        let bare = user.bare
        let resource: String
        if let requested {
            guard let full = try? bare.with(resource: requested) else { return .failed(.badRequest) }
            resource = full.resourcepart!
        } else {
            resource = Self.generatedResource()
        }
        let full = try! bare.with(resource: resource)
        return shard(bare).withLockedValue { table in
            var resources = table[bare] ?? [:]
            let replaced = resources[resource]?.session
            if replaced == nil && resources.count >= maxSessions { return .failed(.resourceConstraint) }
            resources[resource] = ResourceState(session: makeSession(full), available: false, priority: 0)
            table[bare] = resources
            return .bound(full, replaced: replaced)
        }
    }

    /// Removes the binding if `session` still holds it (a replaced session must not unbind its successor).
    public func unbind(_ session: ClientSession) {
        let bare = session.jid.bare
        shard(bare).withLockedValue { table in
            guard let resource = session.jid.resourcepart, table[bare]?[resource]?.session === session else { return }
            table[bare]![resource] = nil
            if table[bare]!.isEmpty { table[bare] = nil }
        }
    }

    public func setPresence(of session: ClientSession, available: Bool, priority: Int) {
        let bare = session.jid.bare
        shard(bare).withLockedValue { table in
            guard let resource = session.jid.resourcepart, table[bare]?[resource]?.session === session else { return }
            table[bare]![resource]!.available = available
            table[bare]![resource]!.priority = priority
        }
    }

    public func location(of full: JID) -> SessionLocation? {
        guard let resource = full.resourcepart else { return nil }
        return shard(full.bare).withLockedValue { $0[full.bare]?[resource].map { .local($0.session) } }
    }

    /// All resources of an account.
    public func resources(of bare: JID) -> [ResourceState] {
        shard(bare).withLockedValue { table in table[bare].map { Array($0.values) } ?? [] }
    }

    public var sessionCount: Int {
        shards.reduce(0) { sum, shard in sum + shard.withLockedValue { $0.values.reduce(0) { $0 + $1.count } } }
    }

    public var allSessions: [ClientSession] {
        shards.flatMap { shard in shard.withLockedValue { $0.values.flatMap { $0.values.map(\.session) } } }
    }

    private static func generatedResource() -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789")
        var generator = SystemRandomNumberGenerator()
        return "starling-" + String((0..<10).map { _ in alphabet.randomElement(using: &generator)! })
    }
}
