import Foundation
import Logging
import StarlingAPI
import Yams

/// How a client listener does TLS.
public enum ListenerTLS: String, Sendable {
    /// Plaintext first, `<starttls/>` offered (RFC 6120 §5).
    case starttls
    /// TLS from the first byte (XEP-0368).
    case direct
}

public struct ListenerConfiguration: Sendable, Equatable {
    public var address: String
    public var port: Int
    public var tls: ListenerTLS
    public var backlog: Int
    /// Connections start with a PROXY protocol header (v1 or v2) from a load balancer.
    public var proxyProtocol = false
}

/// An HTTP listener (`type: http`): XMPP over WebSocket and the HTTP documents, by path.
public struct HTTPListenerConfiguration: Sendable, Equatable {
    public var address: String
    public var port: Int
    /// TLS at the listener; false for plaintext (behind a TLS-terminating proxy, or for local use).
    public var directTLS: Bool
    public var backlog: Int
    /// Proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed.
    public var trustedProxies: [String]
    /// The WebSocket URL to advertise (XEP-0156) instead of one built from each request.
    public var publicWebSocketURL: String?
    /// Serve Prometheus metrics at `/metrics`.
    public var metrics = false
    /// Serve XMPP (WebSocket, BOSH, XEP-0156) and modules' paths; false on an admin listener.
    public var servesXMPP = true
    /// Serve the admin API at `/api/v1/`, for requests bearing the token in this file (`type: admin`).
    public var adminTokenFile: String?
}

public struct TLSConfiguration: Sendable, Equatable {
    /// PEM certificate chain; nil means "generate a self-signed one for development".
    public var certificatePath: String?
    public var privateKeyPath: String?
    /// Refuse authentication before TLS.
    public var required: Bool
}

public struct AuthConfiguration: Sendable, Equatable {
    public var mechanisms: [String]
    public var scramIterations: Int
    /// Seconds a wrong password waits before `<not-authorized/>`.
    public var failureDelay: Double
    /// Failures from one address within `failureWindow` after which each attempt is slowed further.
    public var failuresBeforeSlowdown: Int
    public var failureWindow: Double
    /// Failures for one account within `failureWindow`, from any addresses, after which only addresses
    /// the account logged in from before may try again until the window ends (a botnet guessing one
    /// password); 0 turns it off.
    public var accountFailuresBeforeLockout = 10
    /// Offer PLAIN on connections without TLS (load tests on loopback only).
    public var plainWithoutTLS: Bool
    /// Who decides passwords: "internal" (the stored SCRAM keys) or the name of an enabled module that
    /// authenticates (`lua`, or a plugin); `hostMethods` overrides it per host.
    public var method = "internal"
    public var hostMethods: [String: String] = [:]
    /// The access rule deciding who may log in, and from where (`auth.access`).
    public var access = "all"
    /// Per mechanism, the access rule deciding which client addresses it is offered to (`auth.mechanism_access`).
    public var mechanismAccess: [String: String] = [:]

    /// XEP-0484 FAST tokens (`auth.fast`).
    public var fast = FASTConfiguration()

    /// The method used on `host`.
    public func method(for host: String) -> String { hostMethods[host] ?? method }
}

/// XEP-0484 FAST: tokens a client gets after one password login and logs in with afterwards.
public struct FASTConfiguration: Sendable, Equatable {
    /// Offered inline in SASL2 (over TLS, on hosts with stored accounts); empty turns FAST off.
    public var mechanisms = ["HT-SHA-256-ENDP", "HT-SHA-256-NONE"]
    /// Seconds a token is valid from its issue.
    public var tokenLifetime = 1_814_400
    /// Seconds after its issue from which a token used to log in is replaced by a new one.
    public var rotateAfter = 86_400
    /// Client installations of one account that may hold tokens; the one issued longest ago loses its own.
    public var maxClientsPerAccount = 32
    /// The file with the key tokens are derived from; nil: the cluster's secret, or `fast-token.key` in data_dir
    /// (made at first start).
    public var keyFile: String?

    public init() {}
}

public struct LimitsConfiguration: Sendable, Equatable {
    public var maxStanzaSize: Int
    public var maxDepth: Int
    public var maxSessionsPerUser: Int
    /// Seconds allowed from connect to bound resource.
    public var authTimeout: Double
    /// Seconds without any input after which a session is closed.
    public var idleTimeout: Double
    /// Seconds between whitespace keepalives we send.
    public var keepaliveInterval: Double
    /// Bytes per second read from one client at most (0: no limit), and the burst allowed above it.
    public var readRate: Int = 0
    public var readBurst: Int = 0
    /// Connections from one address that have not authenticated yet, at most (0: no limit).
    public var maxUnauthenticatedPerAddress = 0
    /// Connections from one address at most (0: no limit).
    public var maxConnectionsPerAddress = 0
    /// New connections per second from one address (0: no limit), and how many may come at once.
    public var connectionRate = 0.0
    public var connectionBurst = 1
}

public enum StorageBackend: String, Sendable { case sqlite, postgresql }

public struct StorageConfiguration: Sendable, Equatable {
    public var backend: StorageBackend
    /// SQLite file.
    public var path: String
    /// PostgreSQL connection URL.
    public var url: String?
    public var poolSize: Int
    /// Seconds one storage operation may take.
    public var timeout: Double
}

/// Checks shared by the configuration and the admin commands.
public enum ClusterConfigurationCheck {
    /// `HOST:PORT` with a port of 1...65535.
    public static func isHostAndPort(_ text: String) -> Bool { StarlingConfiguration.hostAndPort(text) != nil }
}

/// How a node finds the other nodes of its cluster.
public enum ClusterDiscovery: String, Sendable { case postgresql, `static` }

/// This node's place in a cluster (`cluster:`); absent means a single node.
public struct ClusterConfiguration: Sendable, Equatable {
    /// Nodes with the same name on the same database form one cluster.
    public var name: String
    /// This node's name, unique in the cluster.
    public var node: String
    /// Where this node's link listens and where the others reach it.
    public var linkHost: String
    public var linkPort: Int
    /// The file holding the secret every node of the cluster shares (never logged).
    public var secretFile: String
    public var discovery: ClusterDiscovery
    /// `HOST:PORT` of other nodes' links, for static discovery (also dialled with postgresql discovery).
    public var peers: [String]
    /// Seconds between link pings and database heartbeats.
    public var heartbeat: Double
    /// Seconds a node may stay unreachable (link down or silent) before the others drop its sessions.
    public var deadAfter: Double
}

/// Federation (`s2s:` and the `type: s2s` listeners); absent when no s2s listener is configured.
public struct S2SConfiguration: Sendable, Equatable {
    public var listeners: [ListenerConfiguration]
    public var requireTLS: Bool
    public var dialback: Bool
    /// XEP-0288 bidirectional streams.
    public var bidi = true
    /// PEM bundle of the authorities whose certificates authenticate peers with SASL EXTERNAL.
    public var caFile: String?
    /// The dialback secret's file; nil: the cluster's secret, or a random one per start on a single node.
    public var dialbackSecretFile: String?
    /// Remote domain → `HOST:PORT` endpoints, tried in order, instead of DNS.
    public var routes: [String: [String]]
    /// `HOST:PORT` of a name server to ask instead of /etc/resolv.conf's.
    public var dnsServer: String?
    public var blockedDomains: [String]
    public var queueLimit: Int
    public var connectTimeout: Double
    public var negotiationTimeout: Double
    public var idleTimeout: Double
    public var maxIncomingPerDomain: Int
}

public struct AdminConfiguration: Sendable, Equatable {
    /// Unix socket `starlingctl` talks to.
    public var socketPath: String
}

/// The whole server configuration, read and validated in one go at start.
public struct StarlingConfiguration: Sendable, Equatable {
    public var hosts: [String]
    public var dataDirectory: String
    public var logLevel: Logger.Level
    public var listeners: [ListenerConfiguration]
    public var httpListeners: [HTTPListenerConfiguration] = []
    public var tls: TLSConfiguration
    public var auth: AuthConfiguration
    public var limits: LimitsConfiguration
    public var storage: StorageConfiguration
    public var admin: AdminConfiguration
    /// Nil when this node runs alone.
    public var cluster: ClusterConfiguration? = nil
    /// Federation; nil when no `type: s2s` listener is configured.
    public var s2s: S2SConfiguration? = nil
    /// `acl:` and `access_rules:`; applied again by `reload-config`.
    public var access = AccessControl()
    /// Modules enabled on every host, in config order.
    public var modules: [ModuleConfiguration]
    /// Hosts with a module set of their own (`host_modules:`).
    public var hostModules: [String: [ModuleConfiguration]]
    /// Plugin modules (`plugins:`): module name → shared library path, resolved.
    public var plugins: [String: String] = [:]
    /// Plugins that could not be loaded, with the reason; their modules are left out.
    public var pluginFailures: [String: String] = [:]

    /// The modules enabled on `host`.
    public func modules(for host: String) -> [ModuleConfiguration] {
        hostModules[host] ?? modules
    }
    /// Where this configuration came from (for messages and reloads).
    public var sourcePath: String

    // MARK: Declarations: each option once, with default, bounds and doc.

    static let hostsOption = ConfigOption<[String]>("hosts", default: ["localhost"], doc: "Domains this server serves.")
    static let dataDirectoryOption = ConfigOption<String>("data_dir", default: "var", doc: "Directory for the embedded database, generated certificates and the admin socket; relative to the config file.")
    static let logLevelOption = ConfigOption<String>("log_level", default: "info", oneOf: Logger.Level.allCases.map(\.rawValue), doc: "Log verbosity.")

    static let listenerAddress = ConfigOption<String>("address", default: "0.0.0.0", doc: "Address to bind.")
    static let listenerPort = ConfigOption<Int>("port", default: 5222, range: 0...65535, doc: "TCP port (0 picks a free one, reported on standard output).")
    static let listenerTLS = ConfigOption<String>("tls", default: "starttls", oneOf: ["starttls", "direct"], doc: "starttls (RFC 6120) or direct TLS (XEP-0368).")
    static let listenerBacklog = ConfigOption<Int>("backlog", default: 1024, range: 1...65535, doc: "Listen backlog.")
    static let listenerProxyProtocol = ConfigOption<Bool>("proxy_protocol", default: false, doc: "Every connection starts with a PROXY protocol header (v1 or v2, HAProxy's send-proxy/send-proxy-v2) naming the client: logs, limits and connection hooks see the client's address. Only for listeners that nothing but the load balancer can reach.")
    static let listenerType = ConfigOption<String>("type", default: "c2s", oneOf: ["c2s", "s2s", "http", "admin"], doc: "Listener kind: c2s (XMPP over TCP), s2s (other servers; configuring one turns federation on, see s2s:), http (XMPP over WebSocket at /xmpp-websocket, BOSH, XEP-0156 at /.well-known/host-meta) or admin (the JSON admin API at /api/v1/, see docs/admin-api.yaml).")
    static let s2sListenerPort = ConfigOption<Int>("port", default: 5269, range: 0...65535, doc: "TCP port of an s2s listener (0 picks a free one, reported on standard output).")
    static let adminListenerAddress = ConfigOption<String>("address", default: "127.0.0.1", doc: "Address an admin listener binds: loopback unless the operators' network is trusted as much.")
    static let adminListenerPort = ConfigOption<Int>("port", default: 5281, range: 0...65535, doc: "TCP port of an admin listener (0 picks a free one, reported on standard output).")
    static let adminTokenFile = ConfigOption<String?>("token_file", default: nil, doc: "File holding the admin API's bearer token (at least 32 characters), relative to the config file; requests without it get 401. An admin listener binds 127.0.0.1:5281 unless address and port say otherwise.")
    static let httpListenerPort = ConfigOption<Int>("port", default: 5280, range: 0...65535, doc: "TCP port of an http listener (0 picks a free one, reported on standard output).")
    static let httpListenerTLS = ConfigOption<String>("tls", default: "none", oneOf: ["none", "direct"], doc: "An http listener's TLS: none (plaintext, usually behind a TLS-terminating proxy) or direct (HTTPS with the server's certificate).")
    static let httpTrustedProxies = ConfigOption<[String]>("trusted_proxies", default: [], doc: "Addresses of proxies in front of an http listener whose X-Forwarded-For (the client's address, for logs and limits) and X-Forwarded-Proto (https makes the connection count as encrypted) are believed.")
    static let httpMetrics = ConfigOption<Bool>("metrics", default: false, doc: "Serve Prometheus metrics at /metrics on this http listener (give it a loopback address, or one only the monitoring can reach).")
    static let httpPublicWebSocketURL = ConfigOption<String?>("websocket_url", default: nil, doc: "The WebSocket URL advertised in /.well-known/host-meta when clients reach the server through another URL than the request shows; unset builds it from each request's Host.")

    static let tlsCertificate = ConfigOption<String?>("certificate", default: nil, doc: "PEM certificate chain. When unset, a self-signed certificate is generated in data_dir (development only).")
    static let tlsKey = ConfigOption<String?>("key", default: nil, doc: "PEM private key for the certificate.")
    static let tlsRequired = ConfigOption<Bool>("required", default: true, doc: "Require STARTTLS before authentication.")

    static let supportedMechanisms = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
    static let authMechanisms = ConfigOption<[String]>("mechanisms", default: supportedMechanisms, doc: "SASL mechanisms offered, in order of preference. PLAIN is only offered over TLS.") { value in
        let unknown = value.filter { !supportedMechanisms.contains($0) }
        if !unknown.isEmpty { return "unknown mechanism \(unknown.joined(separator: ", ")) (known: \(supportedMechanisms.joined(separator: ", ")))" }
        return value.isEmpty ? "at least one mechanism is needed" : nil
    }
    static let authIterations = ConfigOption<Int>("scram_iterations", default: 4096, range: 4096...1_000_000, doc: "PBKDF2 iterations for newly stored SCRAM credentials.")
    static let authFailureDelay = ConfigOption<Double>("failure_delay", default: 1.0, range: 0...30, doc: "Seconds before a failed authentication is answered.")
    static let authFailuresBeforeSlowdown = ConfigOption<Int>("failures_before_slowdown", default: 5, range: 1...1000, doc: "Failed attempts from one IP address after which each further failure waits twice as long (up to 30 s).")
    static let authFailureWindow = ConfigOption<Double>("failure_window", default: 300, range: 1...86400, doc: "Seconds over which failures from one address (and for one account) are counted.")
    static let authAccountLockout = ConfigOption<Int>(
        "account_failures_before_lockout", default: 10, range: 0...100_000,
        doc: "Failed logins for one account within failure_window, from any addresses, after which only addresses it logged in from before may try until the window ends (others get temporary-auth-failure); 0 turns this off.")
    static let authMethod = ConfigOption<String>("method", default: "internal", doc: "Who decides passwords: internal (stored SCRAM keys), or an enabled module that authenticates (lua, or a plugin such as external_auth). Hosts using a module offer PLAIN only, over TLS.")
    static let authAccess = ConfigOption<String>("access", default: "all", doc: "The access rule deciding who may log in, by account and client address (access_rules; `all` lets everyone with the right password in).")
    static let fastMechanismNames = ["HT-SHA-256-ENDP", "HT-SHA-256-NONE"]
    static let fastMechanisms = ConfigOption<[String]>("mechanisms", default: fastMechanismNames, doc: "XEP-0484 FAST mechanisms offered in SASL2 (over TLS only; HT-SHA-256-ENDP is bound to the server certificate, HT-SHA-256-NONE serves web clients). Empty turns FAST off.") { value in
        let unknown = value.filter { !fastMechanismNames.contains($0) }
        return unknown.isEmpty ? nil : "unknown FAST mechanism \(unknown.joined(separator: ", ")) (known: \(fastMechanismNames.joined(separator: ", ")))"
    }
    static let fastTokenLifetime = ConfigOption<Int>("token_lifetime", default: 1_814_400, range: 3600...31_536_000, doc: "Seconds a FAST token is valid: a device offline longer than this logs in with its password again.")
    static let fastRotateAfter = ConfigOption<Int>("rotate_after", default: 86_400, range: 0...31_536_000, doc: "Seconds after its issue from which a FAST login replaces the token with a new one (the old one stays valid until the new one is used); less than token_lifetime.")
    static let fastMaxClients = ConfigOption<Int>("max_clients_per_account", default: 32, range: 1...10_000, doc: "Client installations of one account that may hold FAST tokens; a new one takes the place of the one issued longest ago.")
    static let fastKeyFile = ConfigOption<String?>("key_file", default: nil, doc: "File with the key FAST tokens are derived from (at least 16 characters; the database stores only nonces), relative to the config file. Unset: the cluster's secret, or fast-token.key in data_dir, made at first start.")
    static let authPlainWithoutTLS = ConfigOption<Bool>("plain_without_tls", default: false, doc: "Offer PLAIN on connections without TLS when tls.required is false. It sends passwords in the clear: for load tests on loopback only.")

    static let maxStanzaSize = ConfigOption<Int>("max_stanza_size", default: 262_144, range: 1024...16_777_216, doc: "Largest stanza in bytes; larger gets <policy-violation/>.")
    static let maxDepth = ConfigOption<Int>("max_depth", default: 32, range: 4...256, doc: "Deepest element nesting inside a stanza.")
    static let maxSessions = ConfigOption<Int>("max_sessions_per_user", default: 10, range: 1...1000, doc: "Resources one account may have bound at once.")
    static let authTimeout = ConfigOption<Double>("auth_timeout", default: 30, range: 1...3600, doc: "Seconds from connect until a resource must be bound.")
    static let idleTimeout = ConfigOption<Double>("idle_timeout", default: 600, range: 5...86400, doc: "Seconds without any data from a client before its session is closed; after half of it the server pings the client (XEP-0199).")
    static let keepaliveInterval = ConfigOption<Double>("keepalive_interval", default: 90, range: 1...86400, doc: "Seconds of silence towards a client after which a whitespace keepalive is sent.")
    static let readRate = ConfigOption<Int>("read_rate", default: 131_072, range: 0...1_073_741_824, doc: "Bytes per second read from one client at most; a client that sends faster is read more slowly (TCP pushes back), so one flooding client cannot starve the others. 0: no limit.")
    static let maxUnauthenticatedPerAddress = ConfigOption<Int>(
        "max_unauthenticated_per_address", default: 50, range: 0...1_000_000,
        doc: "Connections from one IP address that have not authenticated yet, at most (slow-loris); more are closed at once. 0: no limit.")
    static let maxConnectionsPerAddress = ConfigOption<Int>(
        "max_connections_per_address", default: 5_000, range: 0...10_000_000,
        doc: "Connections from one IP address at most (a NAT's users share one; behind a load balancer enable proxy_protocol). 0: no limit.")
    static let connectionRate = ConfigOption<Double>(
        "connection_rate", default: 50, range: 0...1_000_000, doc: "New connections per second from one IP address, on average. 0: no limit.")
    static let connectionBurst = ConfigOption<Int>(
        "connection_burst", default: 500, range: 1...10_000_000, doc: "New connections one IP address may open at once before connection_rate applies.")
    static let readBurst = ConfigOption<Int>("read_burst", default: 65_536, range: 1024...1_073_741_824, doc: "Bytes a client may send at once above read_rate (a reconnecting client's backlog, say).")

    static let storageBackend = ConfigOption<String>("backend", default: "sqlite", oneOf: ["sqlite", "postgresql"], doc: "Storage backend: the embedded SQLite file, or PostgreSQL.")
    static let storagePath = ConfigOption<String>("path", default: "starling.sqlite", doc: "SQLite database file, relative to data_dir.")
    static let storageURL = ConfigOption<String?>("url", default: nil, doc: "PostgreSQL URL: postgresql://user:password@host:5432/database (or ?host=/socket/dir).")
    static let storagePool = ConfigOption<Int>("pool", default: 10, range: 1...1000, doc: "PostgreSQL connections per node.")
    static let storageTimeout = ConfigOption<Double>("timeout", default: 5, range: 0.1...300, doc: "Seconds a storage operation may take before the request fails with an error (the server itself carries on).")

    static let clusterName = ConfigOption<String>("name", default: "starling", doc: "Cluster name: nodes with the same name on the same PostgreSQL database form one cluster.")
    static let clusterNode = ConfigOption<String?>("node", default: nil, doc: "This node's name, unique in the cluster. Setting it turns clustering on.")
    static let clusterLink = ConfigOption<String?>("link", default: nil, doc: "HOST:PORT this node's link listens on and the other nodes dial (TLS, authenticated with the shared secret).")
    static let clusterSecret = ConfigOption<String?>("secret_file", default: nil, doc: "File with the secret all nodes share (at least 16 characters), relative to the config file.")
    static let clusterDiscovery = ConfigOption<String>("discovery", default: "postgresql", oneOf: ["postgresql", "static"], doc: "postgresql: nodes register in the shared database and find each other there; static: only `peers`.")
    static let clusterPeers = ConfigOption<[String]>("peers", default: [], doc: "Other nodes' links as HOST:PORT (static discovery; with postgresql discovery they are dialled too).")
    static let clusterHeartbeat = ConfigOption<Double>("heartbeat", default: 1, range: 0.1...60, doc: "Seconds between link pings and database heartbeats.")
    static let clusterDeadAfter = ConfigOption<Double>("dead_after", default: 5, range: 0.5...600, doc: "Seconds a node may stay unreachable before the others drop its sessions (its users' messages then go to offline storage).")

    static let s2sRequireTLS = ConfigOption<Bool>("require_tls", default: true, doc: "Refuse server-to-server streams without TLS, in both directions.")
    static let s2sDialback = ConfigOption<Bool>("dialback", default: true, doc: "Server Dialback (XEP-0220) for peers whose certificate does not verify against ca_file (self-signed ones, say). Off: only SASL EXTERNAL with verified certificates.")
    static let s2sBidi = ConfigOption<Bool>("bidi", default: true, doc: "Bidirectional streams (XEP-0288): offer them, and ask for them, so one connection carries stanzas both ways.")
    static let s2sCAFile = ConfigOption<String?>("ca_file", default: "/etc/ssl/certs/ca-certificates.crt", doc: "PEM bundle of the certificate authorities that authenticate peer servers with SASL EXTERNAL (XEP-0178); relative to the config file. Empty: none (dialback only).")
    static let s2sDialbackSecret = ConfigOption<String?>("dialback_secret_file", default: nil, doc: "File with the dialback key secret (at least 16 characters). Unset: the cluster's secret, or a random secret per start on a single node.")
    static let s2sDNSServer = ConfigOption<String?>("dns_server", default: nil, doc: "IPv4 HOST:PORT of the name server for SRV (_xmpps-server and _xmpp-server) and address lookups, instead of /etc/resolv.conf's.")
    static let s2sBlocked = ConfigOption<[String]>("blocked_domains", default: [], doc: "Remote domains this server neither connects to nor accepts streams from.")
    static let s2sQueueLimit = ConfigOption<Int>("queue_limit", default: 1000, range: 1...1_000_000, doc: "Stanzas that may wait for one remote domain's stream to come up; more are bounced with resource-constraint.")
    static let s2sConnectTimeout = ConfigOption<Double>("connect_timeout", default: 10, range: 0.1...300, doc: "Seconds a TCP connection to a remote server may take (each address in turn).")
    static let s2sNegotiationTimeout = ConfigOption<Double>("negotiation_timeout", default: 30, range: 1...600, doc: "Seconds from connection to authenticated stream; slower streams end with connection-timeout and their stanzas bounce with remote-server-timeout.")
    static let s2sIdleTimeout = ConfigOption<Double>("idle_timeout", default: 600, range: 5...86400, doc: "Seconds without data after which a server-to-server stream is closed (whitespace keepalives go every 90 s).")
    static let s2sMaxIncoming = ConfigOption<Int>("max_incoming_per_domain", default: 8, range: 1...1000, doc: "Incoming streams one remote domain may hold open at once.")

    static let adminSocket = ConfigOption<String>("socket", default: "starling.sock", doc: "Unix socket for starlingctl, relative to data_dir (mode 0600).")

    // MARK: Loading

    /// Reads and validates `path`. Every problem is a `ConfigError` naming file, line and key.
    /// - Parameter moduleCatalog: the modules that exist (built in, or loadable), to validate `modules:`.
    /// - Parameter loadPlugin: loads the plugin at a path and returns its module's descriptor. Without
    ///   it (starlingctl, which runs no modules) plugin modules are left out unchecked.
    public static func load(path: String, moduleCatalog: [ModuleDescriptor], loadPlugin: PluginDescriptorLoader? = nil) throws(ConfigError) -> StarlingConfiguration {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ConfigError(file: path, line: nil, key: nil, message: "cannot read: \(error.localizedDescription)")
        }
        return try parse(yaml: text, file: path, moduleCatalog: moduleCatalog, loadPlugin: loadPlugin)
    }

    /// Loads a plugin (module name, resolved path) and returns its module's descriptor.
    public typealias PluginDescriptorLoader = (_ name: String, _ path: String) throws -> ModuleDescriptor

    public static func parse(yaml: String, file: String, moduleCatalog: [ModuleDescriptor], reference: ConfigReference = ConfigReference(),
                             loadPlugin: PluginDescriptorLoader? = nil) throws(ConfigError) -> StarlingConfiguration {
        let root: Node?
        do { root = try Yams.compose(yaml: yaml) } catch let error as YamlError {
            throw ConfigError(file: file, line: Self.line(of: error), key: nil, message: "YAML syntax error: \(Self.problem(of: error))")
        } catch {
            throw ConfigError(file: file, line: nil, key: nil, message: "YAML error: \(error)")
        }
        if let root, root.mapping == nil, root.scalar?.string != "" {
            throw ConfigError(file: file, line: root.mark?.line, key: nil, message: "the top level must be a mapping")
        }
        let top = ConfigSection(file: file, path: "", node: root, reference: reference)
        let baseDirectory = URL(fileURLWithPath: file).deletingLastPathComponent().path

        let hosts = try top.read(hostsOption)
        if hosts.isEmpty { throw top.error("hosts", "at least one host is needed") }
        for host in hosts {
            guard let jid = JID(host), jid.localpart == nil, jid.resourcepart == nil else {
                throw top.error("hosts", "'\(host)' is not a valid domain")
            }
        }
        let dataDirectory = resolve(try top.read(dataDirectoryOption), against: baseDirectory)
        let logLevel = Logger.Level(rawValue: try top.read(logLevelOption))!

        var listeners: [ListenerConfiguration] = []
        let listenerSections = try top.sections("listeners") ?? []
        reference.record(key: "listeners", type: "section", defaultText: "", doc: "Client listeners (list). Default: STARTTLS on 5222 and direct TLS on 5223.")
        var httpListeners: [HTTPListenerConfiguration] = []
        var s2sListeners: [ListenerConfiguration] = []
        // Token files are read once every option is (so the reference lists them all), before the end.
        var tokenChecks: [(section: ConfigSection, path: String?)] = []
        for section in listenerSections {
            let type = try section.read(listenerType)
            if type == "admin" {
                let tokenPath = try section.read(adminTokenFile).map { resolve($0, against: baseDirectory) }
                tokenChecks.append((section, tokenPath))
                httpListeners.append(HTTPListenerConfiguration(
                    address: try section.read(adminListenerAddress),
                    port: try section.read(adminListenerPort),
                    directTLS: try section.read(httpListenerTLS) == "direct",
                    backlog: try section.read(listenerBacklog),
                    trustedProxies: [],
                    metrics: try section.read(httpMetrics),
                    servesXMPP: false,
                    adminTokenFile: tokenPath
                ))
                try section.rejectUnknownKeys()
                continue
            }
            if type == "s2s" {
                s2sListeners.append(ListenerConfiguration(
                    address: try section.read(listenerAddress),
                    port: try section.read(s2sListenerPort),
                    tls: ListenerTLS(rawValue: try section.read(listenerTLS))!,
                    backlog: try section.read(listenerBacklog)
                ))
                try section.rejectUnknownKeys()
                continue
            }
            if type == "http" {
                httpListeners.append(HTTPListenerConfiguration(
                    address: try section.read(listenerAddress),
                    port: try section.read(httpListenerPort),
                    directTLS: try section.read(httpListenerTLS) == "direct",
                    backlog: try section.read(listenerBacklog),
                    trustedProxies: try section.read(httpTrustedProxies),
                    publicWebSocketURL: try section.read(httpPublicWebSocketURL),
                    metrics: try section.read(httpMetrics)
                ))
                try section.rejectUnknownKeys()
                continue
            }
            listeners.append(ListenerConfiguration(
                address: try section.read(listenerAddress),
                port: try section.read(listenerPort),
                tls: ListenerTLS(rawValue: try section.read(listenerTLS))!,
                backlog: try section.read(listenerBacklog),
                proxyProtocol: try section.read(listenerProxyProtocol)
            ))
            try section.rejectUnknownKeys()
        }
        // Only HTTP listeners configured is a web-only server: the TCP defaults apply only to an empty list.
        if listenerSections.isEmpty {
            listeners = [
                ListenerConfiguration(address: "0.0.0.0", port: 5222, tls: .starttls, backlog: 1024),
                ListenerConfiguration(address: "0.0.0.0", port: 5223, tls: .direct, backlog: 1024),
            ]
        }

        let tlsSection = try top.section("tls", doc: "TLS for client connections.")
        let tls = TLSConfiguration(
            certificatePath: try tlsSection.read(tlsCertificate).map { resolve($0, against: baseDirectory) },
            privateKeyPath: try tlsSection.read(tlsKey).map { resolve($0, against: baseDirectory) },
            required: try tlsSection.read(tlsRequired)
        )
        if (tls.certificatePath == nil) != (tls.privateKeyPath == nil) {
            throw tlsSection.error(tls.certificatePath == nil ? "certificate" : "key", "certificate and key must be set together")
        }
        try tlsSection.rejectUnknownKeys()

        let access = try readAccessControl(top)
        let authSection = try top.section("auth", doc: "Authentication.")
        var auth = AuthConfiguration(
            mechanisms: try authSection.read(authMechanisms),
            scramIterations: try authSection.read(authIterations),
            failureDelay: try authSection.read(authFailureDelay),
            failuresBeforeSlowdown: try authSection.read(authFailuresBeforeSlowdown),
            failureWindow: try authSection.read(authFailureWindow),
            plainWithoutTLS: try authSection.read(authPlainWithoutTLS)
        )
        auth.accountFailuresBeforeLockout = try authSection.read(authAccountLockout)
        auth.method = try authSection.read(authMethod)
        let rules = access.ruleNames
        let ruleExists: @Sendable (String) -> String? = { rules.contains($0) ? nil : "no access rule '\($0)' (rules: \(rules.sorted().joined(separator: ", ")))" }
        auth.access = try authSection.read(ConfigOption<String>("access", default: "all", doc: authAccess.doc, validate: ruleExists))
        let fastSection = try authSection.section("fast", doc: "XEP-0484 FAST: a client logs in once with its password and gets a token it logs in with afterwards (one round trip, no PBKDF2); tokens are per client installation, rotated, revocable (starlingctl fast-tokens) and revoked by a password change.")
        auth.fast.mechanisms = try fastSection.read(fastMechanisms)
        auth.fast.tokenLifetime = try fastSection.read(fastTokenLifetime)
        auth.fast.rotateAfter = try fastSection.read(fastRotateAfter)
        if auth.fast.rotateAfter >= auth.fast.tokenLifetime {
            throw fastSection.error("rotate_after", "must be less than token_lifetime (\(auth.fast.tokenLifetime))", at: fastSection.valueNode("rotate_after"))
        }
        auth.fast.maxClientsPerAccount = try fastSection.read(fastMaxClients)
        if let keyFile = try fastSection.read(fastKeyFile) {
            let path = resolve(keyFile, against: baseDirectory)
            _ = try readSecret(path, minimumLength: 16, section: fastSection, key: "key_file")
            auth.fast.keyFile = path
        }
        try fastSection.rejectUnknownKeys()
        let mechanismSection = try authSection.section("mechanism_access", doc: "Per SASL mechanism, the access rule deciding which client addresses it is offered to (the account is not known yet when mechanisms are offered): `PLAIN: lan`.")
        for (key, value) in mechanismSection.node?.mapping ?? [:] {
            let mechanism = key.string ?? ""
            guard supportedMechanisms.contains(mechanism) || fastMechanismNames.contains(mechanism) else {
                throw mechanismSection.error(mechanism, "unknown mechanism (known: \((supportedMechanisms + fastMechanismNames).joined(separator: ", ")))", at: key)
            }
            guard let rule = value.string, ruleExists(rule) == nil else {
                throw mechanismSection.error(mechanism, ruleExists(value.string ?? "") ?? "expected a rule name", at: value)
            }
            mechanismSection.claim(mechanism)
            auth.mechanismAccess[mechanism] = rule
        }
        let hostMethodsSection = try authSection.section("host_methods", doc: "Per host, an auth method that replaces auth.method there.")
        for (key, value) in hostMethodsSection.node?.mapping ?? [:] {
            guard let host = key.string.flatMap({ JID($0)?.domainpart }), let method = value.string, !method.isEmpty else {
                throw hostMethodsSection.error(key.string, "expected host: method", at: key)
            }
            guard hosts.contains(where: { JID($0)?.domainpart == host }) else {
                throw hostMethodsSection.error(host, "not one of the configured hosts (\(hosts.joined(separator: ", ")))", at: key)
            }
            auth.hostMethods[host] = method
        }
        try authSection.rejectUnknownKeys()

        let limitsSection = try top.section("limits", doc: "Resource limits on what clients control.")
        var limits = LimitsConfiguration(
            maxStanzaSize: try limitsSection.read(maxStanzaSize),
            maxDepth: try limitsSection.read(maxDepth),
            maxSessionsPerUser: try limitsSection.read(maxSessions),
            authTimeout: try limitsSection.read(authTimeout),
            idleTimeout: try limitsSection.read(idleTimeout),
            keepaliveInterval: try limitsSection.read(keepaliveInterval),
            readRate: try limitsSection.read(readRate),
            readBurst: try limitsSection.read(readBurst)
        )
        limits.maxUnauthenticatedPerAddress = try limitsSection.read(maxUnauthenticatedPerAddress)
        limits.maxConnectionsPerAddress = try limitsSection.read(maxConnectionsPerAddress)
        limits.connectionRate = try limitsSection.read(connectionRate)
        limits.connectionBurst = try limitsSection.read(connectionBurst)
        try limitsSection.rejectUnknownKeys()

        let storageSection = try top.section("storage", doc: "Where accounts and other durable state live.")
        let storage = StorageConfiguration(
            backend: StorageBackend(rawValue: try storageSection.read(storageBackend))!,
            path: resolve(try storageSection.read(storagePath), against: dataDirectory),
            url: try storageSection.read(storageURL),
            poolSize: try storageSection.read(storagePool),
            timeout: try storageSection.read(storageTimeout)
        )
        if storage.backend == .postgresql {
            guard let url = storage.url else { throw storageSection.error("url", "backend postgresql needs a url") }
            guard let scheme = URLComponents(string: url)?.scheme, scheme == "postgresql" || scheme == "postgres" else {
                throw storageSection.error("url", "expected postgresql://user:password@host:5432/database", at: storageSection.valueNode("url"))
            }
        }
        try storageSection.rejectUnknownKeys()

        let cluster = try readCluster(top, storage: storage, baseDirectory: baseDirectory)
        let s2s = try readS2S(top, listeners: s2sListeners, hosts: hosts, baseDirectory: baseDirectory)

        let adminSection = try top.section("admin", doc: "The local admin interface used by starlingctl.")
        let admin = AdminConfiguration(socketPath: resolve(try adminSection.read(adminSocket), against: dataDirectory))
        try adminSection.rejectUnknownKeys()

        // Plugins first: their modules join the catalog `modules:` is checked against.
        let pluginSection = try top.section("plugins", doc: "Plugin modules: module name → shared library (lib<Name>.so) built from plugins/; relative to the config file.")
        var plugins: [String: String] = [:]
        var pluginFailures: [String: String] = [:]
        var catalog = moduleCatalog
        for (key, value) in pluginSection.node?.mapping ?? [:] {
            let name = key.string ?? ""
            guard let path = value.string, !path.isEmpty else { throw pluginSection.error(name, "expected the path of the plugin's shared library", at: value) }
            guard !moduleCatalog.contains(where: { $0.name == name }) else { throw pluginSection.error(name, "a built-in module has this name", at: key) }
            let resolved = resolve(path, against: baseDirectory)
            plugins[name] = resolved
            guard let loadPlugin else { continue }
            do {
                let descriptor = try loadPlugin(name, resolved)
                guard descriptor.name == name else {
                    pluginFailures[name] = "\(resolved) provides module '\(descriptor.name)', not '\(name)'"
                    continue
                }
                catalog.append(descriptor)
            } catch {
                pluginFailures[name] = "\(error)"
            }
        }
        let unavailable = Set(plugins.keys).subtracting(catalog.map(\.name))
        let modules = try readModules(top, hosts: hosts.map { JID($0)!.domainpart }, catalog: catalog, leavingOut: unavailable, accessRules: access.ruleNames)

        for host in hosts.map({ JID($0)!.domainpart }) {
            let method = auth.method(for: host)
            let enabled = (modules.perHost[host] ?? modules.all).map(\.name)
            guard method == "internal" || enabled.contains(method) || unavailable.contains(method) else {
                let key = auth.hostMethods[host] != nil ? "host_methods" : "method"
                throw authSection.error(key, "auth method '\(method)' for \(host) is neither internal nor a module enabled there (\(enabled.joined(separator: ", ")))", at: authSection.valueNode(key))
            }
        }

        try top.rejectUnknownKeys()
        for check in tokenChecks {
            guard let path = check.path else { throw check.section.error("token_file", "an admin listener needs a token_file") }
            _ = try readSecret(path, minimumLength: 32, section: check.section, key: "token_file")
        }
        var configuration = StarlingConfiguration(
            hosts: hosts.map { JID($0)!.domainpart }, dataDirectory: dataDirectory, logLevel: logLevel,
            listeners: listeners, tls: tls, auth: auth, limits: limits, storage: storage, admin: admin,
            modules: modules.all, hostModules: modules.perHost, sourcePath: file
        )
        configuration.httpListeners = httpListeners
        configuration.plugins = plugins
        configuration.pluginFailures = pluginFailures
        configuration.cluster = cluster
        configuration.s2s = s2s
        configuration.access = access
        return configuration
    }

    private static func readCluster(_ top: ConfigSection, storage: StorageConfiguration, baseDirectory: String) throws(ConfigError) -> ClusterConfiguration? {
        let section = try top.section("cluster", doc: "Clustering: several nodes on one PostgreSQL database serve one service.")
        let name = try section.read(clusterName)
        let node = try section.read(clusterNode)
        let link = try section.read(clusterLink)
        let secret = try section.read(clusterSecret)
        let discovery = ClusterDiscovery(rawValue: try section.read(clusterDiscovery))!
        let peers = try section.read(clusterPeers)
        let heartbeat = try section.read(clusterHeartbeat)
        let deadAfter = try section.read(clusterDeadAfter)
        try section.rejectUnknownKeys()
        guard section.node != nil else { return nil }
        guard let node, !node.isEmpty else { throw section.error("node", "a cluster node needs a name") }
        guard storage.backend == .postgresql else {
            throw section.error(nil, "clustering needs the postgresql storage backend (storage.backend is \(storage.backend.rawValue)): the nodes share its database")
        }
        guard let link, let (linkHost, linkPort) = hostAndPort(link, allowingPortZero: true) else {
            throw section.error("link", "expected HOST:PORT for this node's link (port 0 picks a free one, for postgresql discovery)", at: section.valueNode("link"))
        }
        for peer in peers where hostAndPort(peer) == nil {
            throw section.error("peers", "'\(peer)' is not HOST:PORT", at: section.valueNode("peers"))
        }
        if discovery == .static && peers.isEmpty { throw section.error("peers", "static discovery needs peers") }
        if discovery == .static && linkPort == 0 { throw section.error("link", "static discovery needs a fixed port: the peers dial it", at: section.valueNode("link")) }
        guard let secret else { throw section.error("secret_file", "a cluster needs a shared secret file") }
        let secretPath = resolve(secret, against: baseDirectory)
        _ = try readSecret(secretPath, minimumLength: 16, section: section, key: "secret_file")
        if deadAfter < 2 * heartbeat { throw section.error("dead_after", "must be at least twice heartbeat (\(heartbeat))", at: section.valueNode("dead_after")) }
        return ClusterConfiguration(name: name, node: node, linkHost: linkHost, linkPort: linkPort, secretFile: secretPath,
                                    discovery: discovery, peers: peers, heartbeat: heartbeat, deadAfter: deadAfter)
    }

    private static func readS2S(_ top: ConfigSection, listeners: [ListenerConfiguration], hosts: [String], baseDirectory: String) throws(ConfigError) -> S2SConfiguration? {
        let section = try top.section("s2s", doc: "Federation with other servers; on when a `type: s2s` listener is configured.")
        let caFile = try section.read(s2sCAFile).flatMap { $0.isEmpty ? nil : resolve($0, against: baseDirectory) }
        let secretFile = try section.read(s2sDialbackSecret).map { resolve($0, against: baseDirectory) }
        var configuration = S2SConfiguration(
            listeners: listeners, requireTLS: try section.read(s2sRequireTLS), dialback: try section.read(s2sDialback), caFile: caFile,
            dialbackSecretFile: secretFile, routes: [:], dnsServer: try section.read(s2sDNSServer), blockedDomains: try section.read(s2sBlocked).map { $0.lowercased() },
            queueLimit: try section.read(s2sQueueLimit), connectTimeout: try section.read(s2sConnectTimeout),
            negotiationTimeout: try section.read(s2sNegotiationTimeout), idleTimeout: try section.read(s2sIdleTimeout),
            maxIncomingPerDomain: try section.read(s2sMaxIncoming)
        )
        configuration.bidi = try section.read(s2sBidi)
        let routes = try section.section("routes", doc: "Remote domain → HOST:PORT (or a list of them, tried in order) to connect to instead of looking the domain up in DNS.")
        for (key, value) in routes.node?.mapping ?? [:] {
            guard let domain = key.string.flatMap({ JID($0) }), domain.localpart == nil, domain.resourcepart == nil else {
                throw routes.error(key.string, "expected a domain", at: key)
            }
            let endpoints = value.sequence?.compactMap(\.string) ?? value.string.map { [$0] } ?? []
            guard !endpoints.isEmpty, endpoints.allSatisfy({ hostAndPort($0) != nil }) else {
                throw routes.error(domain.domainpart, "expected HOST:PORT or a list of them", at: value)
            }
            if hosts.contains(domain.domainpart) { throw routes.error(domain.domainpart, "is a host of this server", at: key) }
            routes.claim(key.string!)
            configuration.routes[domain.domainpart] = endpoints
        }
        try section.rejectUnknownKeys()
        if let server = configuration.dnsServer {
            guard let (host, _) = hostAndPort(server), host.split(separator: ".").count == 4, host.split(separator: ".").allSatisfy({ UInt8($0) != nil }) else {
                throw section.error("dns_server", "expected an IPv4 address and port, HOST:PORT", at: section.valueNode("dns_server"))
            }
        }
        if let secretFile { _ = try readSecret(secretFile, minimumLength: 16, section: section, key: "dialback_secret_file") }
        if let caFile, !FileManager.default.fileExists(atPath: caFile), section.valueNode("ca_file") != nil {
            throw section.error("ca_file", "cannot read \(caFile)", at: section.valueNode("ca_file"))
        }
        if !configuration.dialback && caFile == nil {
            throw section.error("dialback", "without dialback, peers can only authenticate with certificates: set ca_file", at: section.valueNode("dialback"))
        }
        return listeners.isEmpty ? nil : configuration
    }

    /// The trimmed contents of a secret file `key` names, which must hold at least `minimumLength` characters.
    static func readSecret(_ path: String, minimumLength: Int, section: ConfigSection, key: String) throws(ConfigError) -> String {
        guard let contents = FileManager.default.contents(atPath: path) else {
            throw section.error(key, "cannot read \(path)", at: section.valueNode(key))
        }
        let secret = String(decoding: contents, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard secret.count >= minimumLength else {
            throw section.error(key, "\(path) holds fewer than \(minimumLength) characters", at: section.valueNode(key))
        }
        return secret
    }

    /// Splits `HOST:PORT` (a port of 1...65535, or 0 when allowed).
    public static func hostAndPort(_ text: String, allowingPortZero: Bool = false) -> (String, Int)? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
              (allowingPortZero ? 0 : 1)...65535 ~= port else { return nil }
        let host = String(text[..<colon])
        return host.isEmpty ? nil : (host, port)
    }

    /// The documentation of every option, generated from the declarations.
    public static func referenceText(moduleCatalog: [ModuleDescriptor]) -> String {
        let reference = ConfigReference()
        let example = "listeners:\n  - port: 5222\n  - type: http\n  - type: admin\nmodules:\n" + moduleCatalog.map { "  \($0.name): {}\n" }.joined()
        _ = try? parse(yaml: example, file: "(reference)", moduleCatalog: moduleCatalog, reference: reference)
        return reference.text
    }

    private static func resolve(_ path: String, against base: String) -> String {
        if path.hasPrefix("/") { return path }
        return URL(fileURLWithPath: base).appendingPathComponent(path).standardizedFileURL.path
    }

    private static func line(of error: YamlError) -> Int? {
        switch error {
        case .scanner(_, _, let mark, _), .parser(_, _, let mark, _): return mark.line
        default: return nil
        }
    }

    private static func problem(of error: YamlError) -> String {
        switch error {
        case .scanner(_, let problem, _, _), .parser(_, let problem, _, _): return problem
        default: return "\(error)"
        }
    }
}
