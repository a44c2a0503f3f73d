import Foundation
import NIOConcurrencyHelpers
import NIOCore
import StarlingAPI
import StarlingXML
import StarlingCluster
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

/// Where a stanza for a full JID goes: a session on this node, or one that another node of the cluster
/// holds (the router forwards it over that node's link).
public enum SessionLocation: Sendable {
    case local(ClientSession)
    case remote(node: String)
}

/// The routing state of one bound resource, on this node or another.
public struct ResourceState: Sendable {
    public var jid: JID
    public var location: SessionLocation
    /// Sent available presence (RFC 6121 §4.2) and not since unavailable.
    public var available: Bool
    public var priority: Int
    /// The last available presence as the client sent it (probes are answered with it).
    public var presence: XMLElement?
    public var flags: Set<String>
    /// When it was bound (µs since the epoch): of two bindings of one full JID, the later wins.
    public var boundAt: UInt64

    /// The local session, if it is bound on this node.
    public var session: ClientSession? {
        if case .local(let session) = location { return session }
        return nil
    }

    /// What modules are told of it (the presence only while available).
    var info: ResourceInfo {
        ResourceInfo(jid: jid, available: available, priority: priority, isLocal: session != nil, presence: available ? presence : nil, flags: flags)
    }

    /// The node holding it, for a remote resource.
    public var node: String? {
        if case .remote(let node) = location { return node }
        return nil
    }

    var clusterEntry: ClusterSession {
        ClusterSession(jid: jid, boundAt: boundAt, priority: priority, presence: available ? (presence ?? Self.bareAvailability) : nil, flags: flags)
    }

    /// Stands in for a presence nobody recorded (a module marked the resource available itself).
    static let bareAvailability = XMLElement(name: "presence", namespace: Namespace.client)
}

/// A change to this node's own sessions, for the other nodes of a cluster.
public enum LocalSessionChange: Sendable {
    case updated(ClusterSession)
    case unbound(JID, boundAt: UInt64)
}

/// One account's resources, by resource and as a list. Routing lists them for every message and changes
/// are rare, so the list is kept ready (handing it out is one reference) instead of built per lookup.
struct AccountResources: Sendable {
    private var byResource: [String: ResourceState] = [:]
    private(set) var all: [ResourceState] = []
    /// `all` as modules see it.
    private(set) var infos: [ResourceInfo] = []

    subscript(resource: String) -> ResourceState? {
        get { byResource[resource] }
        set {
            byResource[resource] = newValue
            all = Array(byResource.values)
            infos = all.map(\.info)
        }
    }

    var count: Int { byResource.count }
    var isEmpty: Bool { byResource.isEmpty }
}

/// Every bound resource: this node's, and in a cluster the other nodes' (replicated from their
/// announcements). Sharded by bare JID so sessions on different event loops rarely meet on the same lock,
/// and never hold it longer than a dictionary operation.
public final class SessionRegistry: Sendable {
    private static let shardCount = 64
    private let shards: [NIOLockedValueBox<[JID: AccountResources]>]
    /// Hears of every change to local sessions (the cluster broadcasts them); called outside the locks.
    private let onLocalChange: @Sendable (LocalSessionChange) -> Void

    public init(onLocalChange: @escaping @Sendable (LocalSessionChange) -> Void = { _ in }) {
        shards = (0..<Self.shardCount).map { _ in NIOLockedValueBox([:]) }
        self.onLocalChange = onLocalChange
    }

    private func shard(_ bare: JID) -> NIOLockedValueBox<[JID: AccountResources]> {
        shards[Int(UInt(bitPattern: bare.hashValue) % UInt(Self.shardCount))]
    }

    public enum BindOutcome {
        case bound(JID, replaced: SessionLocation?)
        case failed(StanzaErrorCondition)
    }

    static func now() -> UInt64 { UInt64(max(0, Date().timeIntervalSince1970 * 1_000_000)) }

    /// Binds `resource` (or a generated one) for `user`. A resource already bound (here or on another
    /// node) is taken over and its location returned so the caller can close it with `<conflict/>`
    /// (RFC 6120 §7.7.2.2). `maxSessions` counts the account's resources on every node.
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
        let outcome: (BindOutcome, ResourceState?) = shard(bare).withLockedValue { table in
            var resources = table[bare] ?? AccountResources()
            let replaced = resources[resource]?.location
            if replaced == nil && resources.count >= maxSessions { return (.failed(.resourceConstraint), nil) }
            let state = ResourceState(jid: full, location: .local(makeSession(full)), available: false, priority: 0, presence: nil, flags: [],
                                      boundAt: Self.now())
            resources[resource] = state
            table[bare] = resources
            return (.bound(full, replaced: replaced), state)
        }
        if let state = outcome.1 { onLocalChange(.updated(state.clusterEntry)) }
        return outcome.0
    }

    /// Moves a bound resource to another session object (a resumed stream, XEP-0198), keeping its
    /// presence, flags and binding time; false when `old` no longer holds it.
    public func transfer(from old: ClientSession, to new: ClientSession) -> Bool {
        let bare = old.jid.bare
        return shard(bare).withLockedValue { table in
            guard let resource = old.jid.resourcepart, var state = table[bare]?[resource], state.session === old else { return false }
            state.location = .local(new)
            table[bare]![resource] = state
            return true
        }
    }

    /// Removes the binding if `session` still holds it (a replaced session must not unbind its successor).
    public func unbind(_ session: ClientSession) {
        let bare = session.jid.bare
        let removed: ResourceState? = shard(bare).withLockedValue { table in
            guard let resource = session.jid.resourcepart, let state = table[bare]?[resource], state.session === session else { return nil }
            table[bare]![resource] = nil
            if table[bare]!.isEmpty { table[bare] = nil }
            return state
        }
        if let removed { onLocalChange(.unbound(removed.jid, boundAt: removed.boundAt)) }
    }

    /// Records a local session's own presence (nil: unavailable).
    public func setPresence(of full: JID, _ presence: XMLElement?, priority: Int) {
        updateLocal(full) { state in
            state.available = presence != nil
            state.presence = presence
            state.priority = presence == nil ? 0 : priority
        }
    }

    /// Marks a local resource available or not, keeping the presence last recorded.
    public func setAvailability(of full: JID, available: Bool, priority: Int) {
        updateLocal(full) { state in
            state.available = available
            state.priority = priority
            if !available { state.presence = nil }
        }
    }

    public func setFlag(_ flag: String, _ on: Bool, for full: JID) {
        updateLocal(full) { state in
            if on { state.flags.insert(flag) } else { state.flags.remove(flag) }
        }
    }

    /// Changes a local resource's state and announces it if anything changed.
    private func updateLocal(_ full: JID, _ change: (inout ResourceState) -> Void) {
        guard let resource = full.resourcepart else { return }
        let bare = full.bare
        let changed: ClusterSession? = shard(bare).withLockedValue { table in
            guard var state = table[bare]?[resource], state.session != nil else { return nil }
            let before = state.clusterEntry
            change(&state)
            table[bare]![resource] = state
            let after = state.clusterEntry
            return after == before ? nil : after
        }
        if let changed { onLocalChange(.updated(changed)) }
    }

    public func location(of full: JID) -> SessionLocation? {
        guard let resource = full.resourcepart else { return nil }
        return shard(full.bare).withLockedValue { $0[full.bare]?[resource]?.location }
    }

    /// The local session bound to `full`, if any.
    public func localSession(_ full: JID) -> ClientSession? {
        guard case .local(let session)? = location(of: full) else { return nil }
        return session
    }

    /// All resources of an account, on every node.
    public func resources(of bare: JID) -> [ResourceState] {
        shard(bare).withLockedValue { table in table[bare]?.all ?? [] }
    }

    /// All resources of an account, on every node, as modules see them.
    public func resourceInfos(of bare: JID) -> [ResourceInfo] {
        shard(bare).withLockedValue { table in table[bare]?.infos ?? [] }
    }

    /// Sessions bound on this node.
    public var sessionCount: Int {
        shards.reduce(0) { sum, shard in sum + shard.withLockedValue { $0.values.reduce(0) { $0 + $1.all.count { $0.session != nil } } } }
    }

    /// Sessions bound on this node.
    public var allSessions: [ClientSession] {
        shards.flatMap { shard in shard.withLockedValue { $0.values.flatMap { $0.all.compactMap(\.session) } } }
    }

    /// Every resource on every node.
    public var allResources: [ResourceState] {
        shards.flatMap { shard in shard.withLockedValue { $0.values.flatMap(\.all) } }
    }

    /// This node's sessions as the cluster sees them (a snapshot for a peer).
    public var localEntries: [ClusterSession] {
        shards.flatMap { shard in shard.withLockedValue { $0.values.flatMap { $0.all.filter { $0.session != nil }.map(\.clusterEntry) } } }
    }

    // MARK: Other nodes' sessions

    /// Applies another node's announcement. A local session with the same full JID that was bound earlier
    /// is returned for closing with `<conflict/>`: the later binding wins on every node.
    public func applyRemote(_ entry: ClusterSession, from node: String) -> ClientSession? {
        guard let resource = entry.jid.resourcepart else { return nil }
        let bare = entry.jid.bare
        return shard(bare).withLockedValue { table -> ClientSession? in
            var resources = table[bare] ?? AccountResources()
            var displaced: ClientSession?
            if let existing = resources[resource] {
                if existing.boundAt > entry.boundAt { return nil }
                displaced = existing.session
            }
            resources[resource] = ResourceState(jid: entry.jid, location: .remote(node: node), available: entry.available, priority: entry.priority,
                                                presence: entry.presence, flags: entry.flags, boundAt: entry.boundAt)
            table[bare] = resources
            return displaced
        }
    }

    /// Another node's session went away (only if that node still holds it).
    public func removeRemote(_ full: JID, boundAt: UInt64, from node: String) {
        guard let resource = full.resourcepart else { return }
        let bare = full.bare
        shard(bare).withLockedValue { table in
            guard let state = table[bare]?[resource], state.node == node, state.boundAt == boundAt else { return }
            table[bare]![resource] = nil
            if table[bare]!.isEmpty { table[bare] = nil }
        }
    }

    /// Drops every session of `node` and returns them.
    @discardableResult
    public func removeNode(_ node: String) -> [ResourceState] {
        var removed: [ResourceState] = []
        for shard in shards {
            shard.withLockedValue { table in
                for (bare, resources) in table {
                    let theirs = resources.all.filter { $0.node == node }
                    guard !theirs.isEmpty else { continue }
                    removed.append(contentsOf: theirs)
                    var rest = resources
                    for state in theirs { if let resource = state.jid.resourcepart { rest[resource] = nil } }
                    table[bare] = rest.isEmpty ? nil : rest
                }
            }
        }
        return removed
    }

    /// Replaces what this node held for `node` with its snapshot. Returns local sessions that lost to a
    /// later binding there (to close with `<conflict/>`), the snapshot's sessions that were not known
    /// before, and those known before that the snapshot no longer has.
    public func replaceNode(_ node: String, with entries: [ClusterSession]) -> (displaced: [ClientSession], added: [ResourceState], removed: [ResourceState]) {
        let previous = removeNode(node)
        let previousJIDs = Set(previous.map(\.jid))
        let current = Set(entries.map(\.jid))
        var displaced: [ClientSession] = []
        var added: [ResourceState] = []
        for entry in entries {
            if let local = applyRemote(entry, from: node) { displaced.append(local) }
            if !previousJIDs.contains(entry.jid), let state = resources(of: entry.jid.bare).first(where: { $0.jid == entry.jid }), state.node == node {
                added.append(state)
            }
        }
        return (displaced, added, previous.filter { !current.contains($0.jid) })
    }

    private static func generatedResource() -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789")
        var generator = SystemRandomNumberGenerator()
        return "starling-" + String((0..<10).map { _ in alphabet.randomElement(using: &generator)! })
    }
}
