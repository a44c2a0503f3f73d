import Synchronization

/// A server module: a small declaration (name, XEPs, options, dependencies) plus a `register` that
/// tells the core which disco features, IQ handlers and hooks it adds. The core records every
/// registration and undoes them all when the module is unloaded, so modules never clean up after
/// themselves.
///
/// ```swift
/// public final class PingModule: ServerModule {
///     public static let descriptor = ModuleDescriptor(name: "ping", summary: "Answers pings", xeps: ["XEP-0199"])
///     public init(host: any ModuleHost) {}
///     public func register(_ registrar: ModuleRegistrar) {
///         registrar.feature(Namespace.ping)
///         registrar.iq(.get, "ping", Namespace.ping) { _ in .result() }
///     }
/// }
/// ```
public protocol ServerModule: AnyObject, Sendable {
    static var descriptor: ModuleDescriptor { get }
    /// Called once per host the module is enabled on; options are already validated.
    init(host: any ModuleHost) throws
    func register(_ registrar: ModuleRegistrar)
}

/// Why a module cannot start on a host (its options or the services it needs); the server reports it
/// naming the module and host, and does not start.
public struct ModuleStartError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// What a module is, declared once.
public struct ModuleDescriptor: Sendable {
    public var name: String
    public var summary: String
    /// e.g. "XEP-0199".
    public var xeps: [String]
    /// Names of modules that must be enabled too.
    public var dependencies: [String]
    public var options: [ModuleOptionSpec]

    public init(name: String, summary: String, xeps: [String] = [], dependencies: [String] = [], options: [ModuleOptionSpec] = []) {
        self.name = name
        self.summary = summary
        self.xeps = xeps
        self.dependencies = dependencies
        self.options = options
    }
}

/// One module option: type, default, bounds and doc, declared once. The config loader validates the
/// value (naming file and line) before the module ever sees it.
public struct ModuleOptionSpec: Sendable {
    public enum Kind: Sendable, Equatable {
        case integer(ClosedRange<Int>)
        case number(ClosedRange<Double>)
        case boolean
        case string(choices: [String]?)
        case stringList
        /// The name of an access rule (`access_rules:`, or the built-in `all` and `none`), checked at load;
        /// the value is a `.string`, for `ModuleHost.allows(_:user:address:)`.
        case accessRule
    }

    public var key: String
    public var kind: Kind
    public var defaultValue: ModuleOptionValue
    public var doc: String

    public init(_ key: String, _ kind: Kind, default defaultValue: ModuleOptionValue, doc: String) {
        self.key = key
        self.kind = kind
        self.defaultValue = defaultValue
        self.doc = doc
    }
}

public enum ModuleOptionValue: Sendable, Equatable, CustomStringConvertible {
    case integer(Int)
    case number(Double)
    case boolean(Bool)
    case string(String)
    case stringList([String])

    public var description: String {
        switch self {
        case .integer(let value): return String(value)
        case .number(let value): return String(value)
        case .boolean(let value): return String(value)
        case .string(let value): return value
        case .stringList(let value): return "[" + value.joined(separator: ", ") + "]"
        }
    }
}

/// A module's validated options.
public struct ModuleOptions: Sendable, Equatable {
    public let values: [String: ModuleOptionValue]

    public init(_ values: [String: ModuleOptionValue]) { self.values = values }

    public func integer(_ key: String) -> Int {
        if case .integer(let value)? = values[key] { return value }
        preconditionFailure("option \(key) is not a declared integer")
    }

    public func number(_ key: String) -> Double {
        if case .number(let value)? = values[key] { return value }
        if case .integer(let value)? = values[key] { return Double(value) }
        preconditionFailure("option \(key) is not a declared number")
    }

    public func boolean(_ key: String) -> Bool {
        if case .boolean(let value)? = values[key] { return value }
        preconditionFailure("option \(key) is not a declared boolean")
    }

    public func string(_ key: String) -> String {
        if case .string(let value)? = values[key] { return value }
        preconditionFailure("option \(key) is not a declared string")
    }

    public func stringList(_ key: String) -> [String] {
        if case .stringList(let value)? = values[key] { return value }
        preconditionFailure("option \(key) is not a declared string list")
    }
}

/// What the core offers a module. No NIO types: the same API serves dynamic plugins.
public protocol ModuleHost: Sendable {
    /// The host (domain) this instance serves.
    var domain: String { get }
    var options: ModuleOptions { get }
    /// Routes a stanza as if the server sent it (its `from` should be set by the module).
    func route(_ stanza: XMLElement)
    /// Delivers one stanza to many full JIDs at once (a room's occupants): as routing a copy addressed
    /// to each would, but serialized once for all of them.
    func deliver(_ stanza: XMLElement, to recipients: [JID])
    func log(_ level: ModuleLogLevel, _ message: String)
    /// The disco features every enabled module on this host declared (sorted, deduplicated), for
    /// entities answered `for` the server or for accounts.
    func features(for target: IQTarget) -> [String]
    /// The bound resources of an account (on any host this server serves), on every node of a cluster.
    func resources(of bare: JID) -> [ResourceInfo]
    /// Every bound resource of this module's host, on every node of a cluster.
    func boundResources() -> [ResourceInfo]
    /// Marks a resource (bound on this node) with a flag other nodes see too in `ResourceInfo.flags`:
    /// per-session state a module needs wherever the account's stanzas are routed (carbons enabled, roster
    /// requested). Flags go when the session goes.
    func setFlag(_ flag: String, _ on: Bool, for full: JID)
    /// Sends `message` to this host's modules on every other node of the cluster (they hear it as a
    /// `clusterMessage` event): for state a module caches per node, such as settings an account changed
    /// here. Nothing happens on a node that runs alone. Name the element in a namespace of the module's own.
    func broadcastToCluster(_ message: XMLElement)
    /// Tells core routing whether a resource takes messages sent to the bare JID, and at which priority.
    func setAvailability(of full: JID, available: Bool, priority: Int)
    /// Records a resource's presence as it was broadcast (nil: unavailable), its priority taken from it:
    /// routing uses it as `setAvailability` does, and probes (on every node of a cluster) are answered
    /// with it.
    func setPresence(_ presence: XMLElement?, of full: JID)
    /// True for every domain this server serves (not only this module's host).
    func isLocal(_ domain: String) -> Bool
    /// A server-provided service, such as a storage protocol: `host.service((any RosterStore).self)`.
    func service<Service>(_ type: Service.Type) -> Service?
    /// Fires a hook on this host, as the core does (modules may define hook points of their own).
    func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult
    /// Ends every session of the account (with `<not-authorized/>`), e.g. once it has been deleted.
    func closeSessions(of bare: JID)
    /// The components the modules of this host registered (what disco#items on the domain lists).
    var components: [ComponentInfo] { get }
    /// The disco#info identities modules declared for the server's domain or for accounts (sorted,
    /// deduplicated).
    func identities(for target: IQTarget) -> [DiscoIdentity]
    /// What every module's disco#items provider for the request's target returns, in module order; nil
    /// when the request names a node no provider knows.
    func discoItems(_ request: IQRequest) async -> [XMLElement]?
    /// Stops reading from a local session (full JID) until the hold is released: backpressure for a
    /// module whose work for that session's stanzas piles up. Nil when no such session is bound here.
    func holdReads(of session: JID) -> (any ReadHold)?
    /// Whether the access rule `rule` (`access_rules:`, or the built-in `all` and `none`) allows this
    /// account and/or client address; name rules in options of kind `.accessRule` so they are checked at load.
    func allows(_ rule: String, user: JID?, address: String?) -> Bool
}

/// A pause in reading from one session (see `ModuleHost.holdReads`). Reading resumes once every hold
/// on the session is released.
public protocol ReadHold: Sendable {
    /// Ends the hold; calling it again does nothing.
    func release()
}

/// One bound resource as modules see it.
public struct ResourceInfo: Sendable {
    public let jid: JID
    public let available: Bool
    public let priority: Int
    /// False for a resource bound on another node of the cluster.
    public let isLocal: Bool
    /// The resource's last available presence (what probes are answered with); nil while unavailable.
    public let presence: XMLElement?
    /// Flags modules set with `ModuleHost.setFlag`.
    public let flags: Set<String>

    public init(jid: JID, available: Bool, priority: Int, isLocal: Bool = true, presence: XMLElement? = nil, flags: Set<String> = []) {
        self.jid = jid
        self.available = available
        self.priority = priority
        self.isLocal = isLocal
        self.presence = presence
        self.flags = flags
    }
}

public enum ModuleLogLevel: String, Sendable { case debug, info, warning, error }

// MARK: IQ handlers

public enum IQType: String, Sendable { case get, set }

/// Who an IQ handler answers for: the server's domain, or an account's bare JID on this host.
public enum IQTarget: Sendable, Hashable {
    case server
    case account
    case both
}

/// An IQ request handed to a module.
public struct IQRequest: Sendable {
    public let stanza: XMLElement
    /// The full JID of the requesting session.
    public let from: JID
    /// The addressed entity (the server's domain or an account's bare JID).
    public let to: JID
    /// The single child element.
    public var payload: XMLElement { stanza.elements[0] }

    public init(stanza: XMLElement, from: JID, to: JID) {
        self.stanza = stanza
        self.from = from
        self.to = to
    }
}

/// A disco#info identity (XEP-0030).
public struct DiscoIdentity: Sendable, Hashable, Comparable {
    public let category: String
    public let type: String
    public let name: String?

    public init(category: String, type: String, name: String? = nil) {
        self.category = category
        self.type = type
        self.name = name
    }

    public static func < (lhs: DiscoIdentity, rhs: DiscoIdentity) -> Bool {
        (lhs.category, lhs.type, lhs.name ?? "") < (rhs.category, rhs.type, rhs.name ?? "")
    }
}

/// Answers part of a disco#items request (see `ModuleRegistrar.discoItems`).
public typealias DiscoItemsProvider = @Sendable (IQRequest) async throws -> [XMLElement]?

/// A module's answer to an IQ.
public enum IQResponse: Sendable {
    case result(XMLElement?)
    case error(StanzaErrorCondition, text: String?)
    /// An error with an application-specific condition (XEP-0060's `<precondition-not-met/>`, say).
    case failure(StanzaError)

    public static func result() -> IQResponse { .result(nil) }
    public static func error(_ condition: StanzaErrorCondition) -> IQResponse { .error(condition, text: nil) }
}

public typealias IQHandler = @Sendable (IQRequest) async throws -> IQResponse

// MARK: Hooks

/// What a hook handler says about the event. Handlers run in descending priority (higher first);
/// ties run in registration order. Anything but `.pass` ends propagation.
public enum HookResult: Sendable, Equatable {
    /// Not mine (or only observed): go on to the next handler, then the default behaviour.
    case pass
    /// Dealt with: no further handlers, no default behaviour.
    case handled
    /// Refused: the sender gets this error (for stanzas that may be answered) and nothing else happens.
    case reject(StanzaErrorCondition, text: String?)
    /// For stanza events: go on with this stanza instead (later handlers and the default see it).
    case modify(XMLElement)
    /// As `reject`, with an application-specific condition beside the RFC's (XEP-0191's `<blocked/>`).
    case refuse(StanzaError)
}

/// A named event with a typed payload.
public struct HookPoint<Event: Sendable>: Sendable, Hashable {
    public let name: String
    public init(_ name: String) { self.name = name }
}

/// An event carrying a stanza: a handler's `.modify` replaces it for the handlers after it, and the
/// caller gets the last replacement.
public protocol StanzaCarryingEvent: Sendable {
    var stanza: XMLElement { get set }
}

/// A stanza passing through the server.
public struct StanzaEvent: StanzaCarryingEvent {
    public var stanza: XMLElement
    /// The full JID of the local session that sent it, when it came from one.
    public var origin: JID?
    /// The local account or session it is being delivered to, where that is known.
    public var recipient: JID?

    public init(stanza: XMLElement, origin: JID?, recipient: JID? = nil) {
        self.stanza = stanza
        self.origin = origin
        self.recipient = recipient
    }
}

/// A session that was bound or closed.
public struct SessionEvent: Sendable {
    public let jid: JID
    public init(jid: JID) { self.jid = jid }
}

extension HookPoint where Event == StanzaEvent {
    /// A stanza from a local client, `from` stamped, before routing.
    public static let stanzaFromClient = HookPoint("stanza-from-client")
    /// A message for a local account that has no resource to take it (offline storage hooks here).
    public static let messageUndeliverable = HookPoint("message-undeliverable")
    /// Any stanza about to be written to a local session (`recipient` is its full JID).
    public static let stanzaToUser = HookPoint("stanza-to-user")
    /// A message from a client for a local account (`recipient`: the bare or full JID it is addressed
    /// to), once, before it goes to the account's resources or to offline storage: what a handler's
    /// `.modify` makes of it is what every resource, carbon and offline copy carries (archiving stamps
    /// its stanza-id here); `.reject` bounces it.
    public static let messageToAccount = HookPoint("message-to-account")
}

extension HookPoint where Event == StanzaEvent {
    /// A stanza from another domain (over s2s) for a local account or the server, before routing; `origin`
    /// is the remote sender, `recipient` the addressed JID. The presence module takes subscriptions and
    /// probes here; `.reject` bounces it to the remote sender.
    public static let stanzaFromRemote = HookPoint("stanza-from-remote")
    /// A stanza leaving for another domain (over s2s), `from` set; `.reject` bounces it to the local sender.
    public static let stanzaToRemote = HookPoint("stanza-to-remote")
}

/// A server-to-server stream about to open with another domain.
public struct RemoteStreamEvent: Sendable {
    public let domain: String
    /// True for a stream the remote server opened to us.
    public let incoming: Bool
    /// The remote server's address, for incoming streams.
    public let address: String?
    public init(domain: String, incoming: Bool, address: String?) {
        self.domain = domain
        self.incoming = incoming
        self.address = address
    }
}

extension HookPoint where Event == RemoteStreamEvent {
    /// `.reject` (or `.handled`) refuses federation with the domain: no stream is opened or accepted.
    public static let remoteStream = HookPoint("remote-stream")
}

extension HookPoint where Event == StanzaEvent {
    /// A top-level element from a bound client that is not a stanza (a "nonza", e.g. XEP-0352's
    /// `<active/>`). Unless a handler takes it, the stream ends with `<unsupported-stanza-type/>`.
    public static let nonzaFromClient = HookPoint("nonza-from-client")
}

/// An IQ on a stream that has not authenticated yet (in-band registration).
public struct PreAuthIQEvent: Sendable {
    public let stanza: XMLElement
    /// The host the stream is for.
    public let domain: String
    /// The client's IP address, for rate limits.
    public let address: String
    /// Sends the answer on that stream (callable once, from any thread).
    public let reply: @Sendable (XMLElement) -> Void

    public init(stanza: XMLElement, domain: String, address: String, reply: @escaping @Sendable (XMLElement) -> Void) {
        self.stanza = stanza
        self.domain = domain
        self.address = address
        self.reply = reply
    }
}

extension HookPoint where Event == PreAuthIQEvent {
    /// Unless a handler takes it, the IQ gets `<service-unavailable/>`.
    public static let preAuthIQ = HookPoint("pre-auth-iq")
}

/// An access rule asks whether a subject is in an ACL list of kind `lua` (or another module's predicate).
public struct AccessPredicateEvent: Sendable {
    /// The predicate's name, as the list names it.
    public let predicate: String
    public let user: JID?
    public let address: String?
    public init(predicate: String, user: JID?, address: String?) {
        self.predicate = predicate
        self.user = user
        self.address = address
    }
}

extension HookPoint where Event == AccessPredicateEvent {
    /// `.handled` means the subject is in the list; anything else, that it is not.
    public static let accessPredicate = HookPoint("access-predicate")
}

/// A session whose connection was lost while stream management (XEP-0198) keeps it for resumption.
public struct SessionDetachedEvent: Sendable {
    public let jid: JID
    /// The messages written to the lost connection that the client never acknowledged (it may not have
    /// seen them); they are sent again on resumption, or kept as offline messages if none comes.
    public let unacknowledged: [XMLElement]

    public init(jid: JID, unacknowledged: [XMLElement]) {
        self.jid = jid
        self.unacknowledged = unacknowledged
    }
}

extension HookPoint where Event == SessionDetachedEvent {
    /// The session stays bound (stanzas to it are held) until it is resumed (`sessionResumed`) or its
    /// timeout ends it (`sessionClosed`).
    public static let sessionDetached = HookPoint("session-detached")
}

extension HookPoint where Event == SessionEvent {
    public static let sessionBound = HookPoint("session-bound")
    public static let sessionClosed = HookPoint("session-closed")
    /// A detached session was taken over by a new connection (XEP-0198 resumption).
    public static let sessionResumed = HookPoint("session-resumed")
    /// The session continues on another node of the cluster (resumed there): forget what is kept for it
    /// here, without the side effects of its end (it did not end).
    public static let sessionMoved = HookPoint("session-moved")
    /// A resource sent its first available presence (offline messages are delivered then).
    public static let initialPresence = HookPoint("initial-presence")
}

/// A session about to continue on another node of the cluster (resumed there), before `sessionMoved`:
/// a module that keeps something per session which must go on there (where its directed presence went,
/// say) adds it as one element in its own namespace. The other node hands the elements to
/// `sessionArrived`; they travel on the cluster's authenticated links only.
public final class SessionHandoverEvent: Sendable {
    public let jid: JID
    private let collected = Mutex<[XMLElement]>([])

    public init(jid: JID) { self.jid = jid }

    /// Adds `element` to what goes with the session.
    public func carry(_ element: XMLElement) {
        collected.withLock { $0.append(element) }
    }

    /// What handlers added (for the server).
    public var carried: [XMLElement] { collected.withLock { $0 } }
}

extension HookPoint where Event == SessionHandoverEvent {
    public static let sessionHandingOver = HookPoint("session-handing-over")
}

/// A session another node handed over was bound here, before it resumes: what modules there carried for
/// it (`sessionHandingOver`), to take up again.
public struct SessionArrivedEvent: Sendable {
    public let jid: JID
    public let carried: [XMLElement]

    public init(jid: JID, carried: [XMLElement]) {
        self.jid = jid
        self.carried = carried
    }
}

extension HookPoint where Event == SessionArrivedEvent {
    public static let sessionArrived = HookPoint("session-arrived")
}

/// Sessions on another node of the cluster that this node lost sight of (the node died, or the link to
/// it stayed down past its grace period) or saw again (the link came back). Every node hears of it for
/// itself, so a handler acts for this node's own sessions only (tells local contacts that `lost` went
/// away), and together the nodes cover everyone exactly once.
public struct ClusterSessionsEvent: Sendable {
    /// The node they are bound on.
    public let node: String
    public let lost: [ResourceInfo]
    public let restored: [ResourceInfo]

    public init(node: String, lost: [ResourceInfo], restored: [ResourceInfo]) {
        self.node = node
        self.lost = lost
        self.restored = restored
    }
}

/// What a module on another node of the cluster sent with `ModuleHost.broadcastToCluster`.
public struct ClusterMessageEvent: Sendable {
    /// The sending node.
    public let node: String
    public let message: XMLElement

    public init(node: String, message: XMLElement) {
        self.node = node
        self.message = message
    }
}

extension HookPoint where Event == ClusterMessageEvent {
    public static let clusterMessage = HookPoint("cluster-message")
}

extension HookPoint where Event == ClusterSessionsEvent {
    public static let clusterSessionsChanged = HookPoint("cluster-sessions-changed")
}

/// A new client connection, before any byte is read. Connection hooks run on the first configured
/// host's modules (the stream has not named its host yet); `.reject` closes the connection.
public struct ConnectionEvent: Sendable {
    /// The client's IP address.
    public let address: String
    public init(address: String) { self.address = address }
}

extension HookPoint where Event == ConnectionEvent {
    public static let connectionOpened = HookPoint("connection-opened")
}

/// A login attempt, or its failure.
public struct LoginEvent: Sendable {
    public let username: String
    public let host: String
    public let address: String
    public let mechanism: String
    public init(username: String, host: String, address: String, mechanism: String) {
        self.username = username
        self.host = host
        self.address = address
        self.mechanism = mechanism
    }
}

extension HookPoint where Event == LoginEvent {
    /// Before the password is checked; `.reject` refuses the attempt (it counts as a failure).
    public static let loginAttempt = HookPoint("login-attempt")
    /// After a wrong password (or a refused attempt); the result is ignored.
    public static let loginFailed = HookPoint("login-failed")
}

extension HookPoint where Event == SessionEvent {
    /// An account was created (in-band registration); `jid` is its bare JID. The result is ignored.
    public static let userRegistered = HookPoint("user-registered")
}

/// A change to a local account's roster (an item added, changed or removed); the result is ignored.
public struct RosterChangeEvent: Sendable {
    /// The account (bare JID).
    public let user: JID
    public let contact: JID
    /// none, to, from, both, or remove.
    public let subscription: String
    public init(user: JID, contact: JID, subscription: String) {
        self.user = user
        self.contact = contact
        self.subscription = subscription
    }
}

extension HookPoint where Event == RosterChangeEvent {
    public static let rosterChanged = HookPoint("roster-changed")
}

/// Collects a module's registrations. The core keeps them per module and removes them on unload.
public final class ModuleRegistrar: @unchecked Sendable {
    public struct IQKey: Hashable, Sendable {
        public let type: IQType
        public let name: String
        public let namespace: String

        public init(type: IQType, name: String, namespace: String) {
            self.type = type
            self.name = name
            self.namespace = namespace
        }
    }

    public struct IQRegistration: Sendable {
        public let key: IQKey
        public let target: IQTarget
        /// Whether entities of other domains (over s2s) may send it; otherwise they get `<service-unavailable/>`.
        public let fromRemote: Bool
        public let handler: IQHandler
    }

    public struct HookRegistration: Sendable {
        public let name: String
        public let priority: Int
        /// The event type the handler takes.
        public let eventType: ObjectIdentifier
        /// A `TypedHookHandler<Event>` for `eventType`: the server calls it with the event as it is, with no
        /// boxing into `Any` and no dynamic cast per call.
        public let handler: any AnyObject & Sendable

        /// Runs the handler on `event`; an event of another type passes it by.
        public func call<Event: Sendable>(_ event: Event) -> HookResult {
            (handler as? TypedHookHandler<Event>)?.call(event) ?? .pass
        }
    }

    /// A hook handler that keeps its event type.
    public final class TypedHookHandler<Event: Sendable>: Sendable {
        public let call: @Sendable (Event) -> HookResult
        init(_ call: @escaping @Sendable (Event) -> HookResult) { self.call = call }
    }

    /// When a stream feature is offered.
    public enum StreamPhase: Sendable {
        /// After TLS, before authentication (e.g. in-band registration).
        case beforeAuthentication
        /// After authentication, next to resource binding (e.g. client state indication).
        case afterAuthentication
    }

    public let module: String
    public private(set) var features: [(namespace: String, target: IQTarget)] = []
    public private(set) var identities: [(identity: DiscoIdentity, target: IQTarget)] = []
    public private(set) var discoItemProviders: [(provider: DiscoItemsProvider, target: IQTarget)] = []
    public private(set) var streamFeatures: [(element: XMLElement, phase: StreamPhase)] = []
    public private(set) var iqHandlers: [IQRegistration] = []
    public private(set) var hooks: [HookRegistration] = []
    /// Set when the module can decide passwords (used on hosts whose `auth.method` names it).
    public private(set) var passwordCheck: PasswordCheck?
    /// Domains the module serves as a component (see `component(_:name:_:)`).
    public private(set) var components: [ComponentRegistration] = []

    /// HTTP paths the module serves (see `http(_:_:)`).
    public private(set) var httpHandlers: [HTTPRegistration] = []
    /// Commands the module offers the admin API (see `adminCommand(_:doc:_:)`).
    public private(set) var adminCommands: [AdminCommandRegistration] = []

    func addComponent(_ registration: ComponentRegistration) { components.append(registration) }
    func addHTTP(_ registration: HTTPRegistration) { httpHandlers.append(registration) }
    func addAdminCommand(_ registration: AdminCommandRegistration) { adminCommands.append(registration) }

    public init(module: String) { self.module = module }

    /// Offers to decide passwords: a host whose `auth.method` (or `auth.host_methods`) names this module
    /// authenticates every login with `check` instead of the stored SCRAM keys. Such hosts offer PLAIN
    /// only (over TLS), since SCRAM needs keys the server does not have.
    public func authenticator(_ check: @escaping PasswordCheck) { passwordCheck = check }

    /// Adds a disco#info feature var, listed for the server's domain, for accounts, or both.
    public func feature(_ namespace: String, for target: IQTarget = .server) { features.append((namespace, target)) }

    /// Adds a disco#info identity, listed for the server's domain, for accounts (XEP-0163's pubsub/pep), or both.
    public func identity(category: String, type: String, name: String? = nil, for target: IQTarget = .server) {
        identities.append((DiscoIdentity(category: category, type: type, name: name), target))
    }

    /// Adds items to disco#items on the server's domain or on accounts (an account's PEP nodes, say):
    /// `provider` gets the request (its `node`, if any, in the payload) and returns `<item/>` elements,
    /// or nil when the node is not its own.
    public func discoItems(for target: IQTarget, _ provider: @escaping DiscoItemsProvider) {
        discoItemProviders.append((provider, target))
    }

    /// Adds an element to `<stream:features/>` in `phase`.
    public func streamFeature(_ element: XMLElement, phase: StreamPhase) { streamFeatures.append((element, phase)) }

    /// Handles IQs of `type` whose payload is `<name xmlns=namespace/>`.
    /// - Parameter fromRemote: also answer entities of other domains (over s2s). Off by default: a handler
    ///   written for local accounts (credentials, registration, settings) never sees a remote requester.
    public func iq(_ type: IQType, _ name: String, _ namespace: String, target: IQTarget = .server, fromRemote: Bool = false, _ handler: @escaping IQHandler) {
        iqHandlers.append(IQRegistration(key: IQKey(type: type, name: name, namespace: namespace), target: target, fromRemote: fromRemote, handler: handler))
    }

    /// Runs `handler` on `point` with `priority` (higher runs first).
    public func hook<Event>(_ point: HookPoint<Event>, priority: Int = 0, _ handler: @escaping @Sendable (Event) -> HookResult) {
        hooks.append(HookRegistration(name: point.name, priority: priority, eventType: ObjectIdentifier(Event.self), handler: TypedHookHandler(handler)))
    }
}

extension ModuleHost {
    /// None, unless the host says otherwise (the server's does).
    public var components: [ComponentInfo] { [] }

    /// No backpressure, unless the host offers it (the server's does).
    public func holdReads(of session: JID) -> (any ReadHold)? { nil }

    /// A copy addressed to each recipient, routed (the server's host does better).
    public func deliver(_ stanza: XMLElement, to recipients: [JID]) {
        for recipient in recipients {
            var copy = stanza
            copy[attribute: "to"] = recipient.description
            route(copy)
        }
    }

    /// Features of the whole host (what disco#info on the domain lists).
    public var serverFeatures: [String] { features(for: .server) }
    /// Features the server offers on an account's behalf (disco#info on a bare JID).
    public var accountFeatures: [String] { features(for: .account) }
}

/// Versions the core and plugins agree on.
public enum StarlingAPIVersion {
    /// The plugin API of the loaded library (the server's). Bump `compiledAPI` on any change to this
    /// package's public API: a plugin built against another version is refused at load.
    public static var api: Int { compiledAPI }
    /// The API version compiled into the caller. It is emitted into each plugin's own binary, so it
    /// records what the plugin was built against, not what happens to be loaded.
    @_alwaysEmitIntoClient public static var compiledAPI: Int { 9 }
    public static let serverVersion = "0.1.0"
}

/// What a plugin's shared library hands the server. A plugin exports two C functions:
///
/// ```swift
/// @_cdecl("starling_plugin_api_version")
/// public func starlingPluginAPIVersion() -> Int { StarlingAPIVersion.compiledAPI }
///
/// @_cdecl("starling_plugin_module")
/// public func starlingPluginModule() -> UnsafeMutableRawPointer { StarlingPlugin.export(MyModule.self) }
/// ```
///
/// The server calls the second only when the first matches its own API version.
public final class StarlingPlugin: @unchecked Sendable {
    public let module: any ServerModule.Type

    private init(module: any ServerModule.Type) {
        self.module = module
    }

    /// The value `starling_plugin_module` returns.
    public static func export(_ module: any ServerModule.Type) -> UnsafeMutableRawPointer {
        Unmanaged.passRetained(StarlingPlugin(module: module)).toOpaque()
    }

    /// For the server's loader: takes the exported value back.
    public static func take(_ pointer: UnsafeMutableRawPointer) -> StarlingPlugin {
        Unmanaged<StarlingPlugin>.fromOpaque(pointer).takeRetainedValue()
    }
}

/// A module that hands its state to its replacement when it is reloaded (`starlingctl reload-module`).
public protocol StateHandoverModule: ServerModule {
    /// Called on the old instance once the new one is ready.
    func saveState() -> [String: String]
    /// Called on the new instance, before it receives any event.
    func restoreState(_ state: [String: String])
}

/// A module holding live state beyond its registrations (a MUC service's rooms), which must know when
/// it enters and leaves service: a reload builds a new instance while the old one still serves, and
/// a dry run builds one that never serves.
public protocol ActivatableModule: ServerModule {
    /// Called once the host's tables hold this instance: at start, or when a reload installs it (before
    /// the instance it replaces is deactivated, so state can pass from one to the other).
    func activated()
    /// Called once, after `activated()`, when tables without this instance are in place.
    func deactivated()
}

/// A module whose scripts or rules can be read again from disk while it runs (`starlingctl
/// reload-hooks`, SIGHUP).
public protocol ReloadableModule: ServerModule {
    /// Loads everything anew and swaps it in only if all of it loaded; otherwise throws the reason
    /// (naming file and line) and the running version stays. Returns a one-line summary.
    func reload() throws -> String
}

/// A module that counts what it does (calls, failures, ...): `starlingctl status` shows the counters per
/// host, and they are what metrics will export.
public protocol StatusReportingModule: ServerModule {
    /// Counter name (snake_case) → value since the module started.
    var statusCounters: [String: Int] { get }
}

/// Where the server's files are, for modules that read their own (scripts, rule files). Look it up
/// with `host.service(ServerPaths.self)`.
public struct ServerPaths: Sendable {
    /// The directory of the configuration file: relative paths in module options are relative to it.
    public var configDirectory: String
    public var dataDirectory: String

    public init(configDirectory: String, dataDirectory: String) {
        self.configDirectory = configDirectory
        self.dataDirectory = dataDirectory
    }
}

/// One login to decide with a module's authenticator.
public struct PasswordRequest: Sendable {
    public let username: String
    public let host: String
    public let password: String
    /// The client's IP address.
    public let address: String

    public init(username: String, host: String, password: String, address: String) {
        self.username = username
        self.host = host
        self.password = password
        self.address = address
    }
}

/// Decides whether a password is right. Runs off the event loops; may wait on I/O.
public typealias PasswordCheck = @Sendable (PasswordRequest) async throws -> Bool
