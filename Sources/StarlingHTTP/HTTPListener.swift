import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle
import StarlingAPI

/// What one HTTP listener needs: where to listen, how, and what it may believe of proxies.
public struct HTTPListenerSettings: Sendable {
    public var address: String
    public var port: Int
    public var backlog: Int
    /// TLS at this listener (`tls: direct`); nil for plaintext, usually behind a TLS-terminating proxy.
    public var tls: NIOSSLContext?
    /// Addresses whose `X-Forwarded-For` and `X-Forwarded-Proto` headers are believed.
    public var trustedProxies: Set<String>
    /// The largest WebSocket message (one stanza) accepted.
    public var maxMessageBytes: Int
    /// Seconds an HTTP connection may sit idle between requests.
    public var idleTimeout: Int64
    public var webSocketPath = "/xmpp-websocket"
    /// The WebSocket URL advertised by XEP-0156, when the one clients use differs from what the request
    /// shows (a proxy on another path); nil derives it from each request's `Host`.
    public var publicWebSocketURL: String?
    /// Renders the Prometheus text format for `/metrics`; nil serves no metrics here.
    public var metrics: (@Sendable () -> String)?
    /// Serve XMPP over WebSocket and BOSH, XEP-0156 and modules' paths (false on an admin listener).
    public var servesXMPP = true
    /// Serve the admin API at `/api/v1/`.
    public var admin: AdminAPISettings?

    public init(address: String, port: Int, backlog: Int, tls: NIOSSLContext?, trustedProxies: Set<String>,
                maxMessageBytes: Int, idleTimeout: Int64, publicWebSocketURL: String? = nil, metrics: (@Sendable () -> String)? = nil) {
        self.address = address
        self.port = port
        self.backlog = backlog
        self.tls = tls
        self.trustedProxies = trustedProxies
        self.maxMessageBytes = maxMessageBytes
        self.idleTimeout = idleTimeout
        self.publicWebSocketURL = publicWebSocketURL
        self.metrics = metrics
    }
}

/// The admin API of a listener: who carries its requests out, and the token they must bear.
public struct AdminAPISettings: Sendable {
    public var backend: any AdminBackend
    public var token: String

    public init(backend: any AdminBackend, token: String) {
        self.backend = backend
        self.token = token
    }
}

extension HTTPListenerSettings {
    /// Who sent a request from `socket`: its address, or the last `X-Forwarded-For` entry (the one the proxy
    /// itself appended) when the socket is a trusted proxy's; secure when TLS is at this listener or a
    /// trusted proxy said `X-Forwarded-Proto: https`.
    func peer(socket: SocketAddress?, forwardedFor: String?, forwardedProto: String?) -> HTTPPeer {
        let address = socket?.ipAddress ?? "unknown"
        var peer = HTTPPeer(address: address, port: socket?.port ?? 0, secure: tls != nil)
        guard trustedProxies.contains(address) else { return peer }
        if let forwarded = forwardedFor?.split(separator: ",").last?.trimmingCharacters(in: .whitespaces), !forwarded.isEmpty {
            peer.address = forwarded
            peer.port = 0
        }
        if forwardedProto?.lowercased() == "https" { peer.secure = true }
        return peer
    }
}

/// An HTTP listener: one Hummingbird server serving XMPP over WebSocket and the HTTP documents by path.
/// Run it as a `Service`; it shuts down with the service group, waiting for its connections to close.
public struct HTTPListener: Service {
    private let application: Application<RouterResponder<StarlingRequestContext>>

    /// - Parameters:
    ///   - installSession: puts an XMPP session on each accepted WebSocket upgrade.
    ///   - moduleHandler: the handler a host's modules registered for a path prefix, looked up per request
    ///     (so reloads apply at once).
    ///   - onRunning: called with the bound port once the listener accepts connections.
    public init(settings: HTTPListenerSettings, eventLoopGroup: any EventLoopGroup, logger: Logger,
                installSession: @escaping XMPPSessionInstaller,
                moduleHandler: @escaping @Sendable (_ prefix: String, _ host: String) -> ModuleHTTPHandler?,
                onRunning: @escaping @Sendable (Int) async -> Void) {
        let router = Router(context: StarlingRequestContext.self)
        if let admin = settings.admin {
            AdminAPI.addRoutes(to: router, backend: admin.backend, token: admin.token)
        }
        if settings.servesXMPP {
            HostMeta.addRoutes(to: router, settings: settings)
            ModuleRoutes.add(to: router, settings: settings, lookup: moduleHandler)
            BOSHService(group: eventLoopGroup, limits: .init(maxRequestBytes: settings.maxMessageBytes * 4, maxPendingBytes: settings.maxMessageBytes * 4),
                        installSession: installSession, logger: logger).addRoutes(to: router, settings: settings)
            // The WebSocket path without an upgrade: say what it is for instead of "not found".
            router.get(RouterPath(settings.webSocketPath)) { _, _ in
                Response(status: .upgradeRequired, headers: [.upgrade: "websocket", .contentType: "text/plain; charset=utf-8"],
                         body: .init(byteBuffer: ByteBuffer(string: "XMPP over WebSocket (RFC 7395): connect with the 'xmpp' subprotocol.\n")))
            }
        }
        if let metrics = settings.metrics {
            router.get("/metrics") { _, _ in
                Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                         body: .init(byteBuffer: ByteBuffer(string: metrics())))
            }
        }
        application = Application(
            router: router,
            server: HTTPServerBuilder { responder in
                XMPPHTTPChannel(responder: responder, settings: settings, installSession: installSession)
            },
            configuration: .init(address: .hostname(settings.address, port: settings.port), serverName: "Starling", backlog: settings.backlog),
            onServerRunning: { channel in await onRunning(channel.localAddress?.port ?? settings.port) },
            eventLoopGroupProvider: .shared(eventLoopGroup),
            logger: logger
        )
    }

    public func run() async throws {
        try await application.run()
    }
}
