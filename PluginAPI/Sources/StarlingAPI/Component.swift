import Synchronization

/// A stanza addressed to a component's domain (or a JID at it), as the router hands it over.
public struct ComponentStanza: Sendable {
    public let stanza: XMLElement
    /// The sender, already checked: a local session's full JID, or the entity a module sent it as.
    public let from: JID
    /// The addressee, parsed: the component's domain or a JID at it.
    public let to: JID

    public init(stanza: XMLElement, from: JID, to: JID) {
        self.stanza = stanza
        self.from = from
        self.to = to
    }
}

extension ComponentStanza {
    /// The answer to this IQ, from the component's address back to the sender, ready to route.
    public func reply(_ response: IQResponse) -> XMLElement {
        var reply: XMLElement
        switch response {
        case .result(let payload): reply = stanza.iqResult(payload: payload)
        case .error(let condition, let text): reply = stanza.errorReply(condition, text: text)
        case .failure(let error): reply = stanza.errorReply(error)
        }
        reply[attribute: "from"] = to.description
        reply[attribute: "to"] = from.description
        return reply
    }
}

/// Receives every stanza for a component's domain. Called on the sender's thread: hand long work off,
/// and answer through `ModuleHost.route`.
public typealias ComponentHandler = @Sendable (ComponentStanza) -> Void

/// A service a module runs at a domain of its own (a MUC service at `conference.<host>`), listed in the
/// host's disco#items.
public struct ComponentInfo: Sendable, Equatable {
    public let domain: String
    /// Shown in disco#items.
    public let name: String

    public init(domain: String, name: String) {
        self.domain = domain
        self.name = name
    }
}

extension ModuleRegistrar {
    /// Makes this module the component serving `domain`: every stanza addressed to the domain or to a
    /// JID at it, from local sessions and from modules, goes to `handler`. The domain is listed in the
    /// host's disco#items under `name`. Two modules claiming one domain fail at start.
    public func component(_ domain: String, name: String, _ handler: @escaping ComponentHandler) {
        addComponent(ComponentRegistration(info: ComponentInfo(domain: domain, name: name), handler: handler))
    }
}

/// One component registration, as the core keeps it.
public struct ComponentRegistration: Sendable {
    public let info: ComponentInfo
    public let handler: ComponentHandler
}

/// In a cluster, each component domain is served by one node at a time: the first node a stanza for it
/// reaches claims it, the others forward to that node, and when it is lost another claims it. A
/// component's module hears when this node starts serving the domain (a later claim, after another
/// node served it, should reload what that node may have changed in storage) and when it stops (two
/// nodes claimed it at once and the other won: drop what this node holds, its occupants rejoin there).
/// Without a cluster neither event fires: the one node serves every component.
public struct ComponentEvent: Sendable {
    public let domain: String
    public init(domain: String) { self.domain = domain }
}

extension HookPoint where Event == ComponentEvent {
    public static let componentClaimed = HookPoint("component-claimed")
    public static let componentReleased = HookPoint("component-released")
}

/// The server is about to stop (SIGTERM): the last moment to tell clients anything, before their
/// streams close with `<system-shutdown/>`. The result is ignored.
public struct ServerStoppingEvent: Sendable {
    public init() {}
}

extension HookPoint where Event == ServerStoppingEvent {
    public static let serverStopping = HookPoint("server-stopping")
}

/// Every stream has closed and storage is about to close: work a module still has queued for storage
/// (archive writes) finishes now. The server waits for what handlers hand to `finish`, up to a bound.
public final class ServerDrainingEvent: Sendable {
    private let collected = Mutex<[@Sendable () async -> Void]>([])

    public init() {}

    /// Work the server awaits before it closes storage.
    public func finish(_ work: @escaping @Sendable () async -> Void) {
        collected.withLock { $0.append(work) }
    }

    /// What handlers handed over (for the server).
    public var work: [@Sendable () async -> Void] { collected.withLock { $0 } }
}

extension HookPoint where Event == ServerDrainingEvent {
    public static let serverDraining = HookPoint("server-draining")
}

/// A value hook handlers may change, for events with parts a policy can adjust (the role a MUC
/// occupant joins with, the options a room is configured with). Handlers run one after another on one
/// thread, each sees what the previous ones set, and the caller reads the result once they are done.
public final class Adjustable<Value: Sendable>: @unchecked Sendable {
    public var value: Value
    public init(_ value: Value) { self.value = value }
}
