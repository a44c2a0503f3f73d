import HTTPTypes
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import NIOSSL
import NIOWebSocket

/// Who is at the other end of an XMPP session over HTTP (WebSocket or BOSH), as far as the listener can tell.
public struct HTTPPeer: Sendable, Equatable {
    /// The client's address: the socket's, or the one a trusted proxy named in `X-Forwarded-For`.
    public var address: String
    public var port: Int
    /// TLS protects the connection: at this listener, or at a trusted proxy that said `X-Forwarded-Proto: https`.
    public var secure: Bool
}

/// How an XMPP session reaches the server over HTTP.
public enum HTTPSessionKind: Sendable {
    /// On an upgraded connection, behind the WebSocket framing (already in the pipeline): RFC 7395 framing.
    case webSocket
    /// On one end of a local socket pair whose other end is the BOSH session: an ordinary XMPP stream.
    case bosh
}

/// Puts an XMPP session on `channel`. Called on the channel's event loop.
public typealias XMPPSessionInstaller = @Sendable (_ channel: any Channel, _ peer: HTTPPeer, _ kind: HTTPSessionKind) throws -> Void

/// One connection of an HTTP listener: HTTP/1.1 requests go to Hummingbird's responder; an upgrade to
/// WebSocket with the `xmpp` subprotocol at the WebSocket path becomes an XMPP session (RFC 7395).
///
/// The session is a NIO handler fed frame by frame on the connection's own event loop, as on TCP.
/// Hummingbird's WebSocket router would hand frames to an async handler instead, one task hop per
/// stanza; this is its upgrade channel with that one branch replaced.
struct XMPPHTTPChannel: ServerChildChannel, HTTPChannelHandler {
    enum Negotiated: Sendable {
        case xmpp(any Channel)
        case http(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
        case refusedUpgrade(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
    }

    struct Value: ServerChildChannelValue {
        let negotiated: EventLoopFuture<Negotiated>
        let channel: any Channel
    }

    let responder: HTTPChannelHandler.Responder
    let settings: HTTPListenerSettings
    let installSession: XMPPSessionInstaller

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            let sync = channel.pipeline.syncOperations
            if let tls = settings.tls { try sync.addHandler(NIOSSLServerHandler(context: tls)) }
            let settings = self.settings
            let install = self.installSession
            let upgradeAttempted = NIOLoopBoundBox(false, eventLoop: channel.eventLoop)
            let upgrader = NIOTypedWebSocketServerUpgrader<Negotiated>(
                maxFrameSize: settings.maxMessageBytes,
                shouldUpgrade: { channel, head in
                    upgradeAttempted.value = true
                    guard settings.servesXMPP, let headers = Self.acceptXMPPUpgrade(head, path: settings.webSocketPath) else {
                        return channel.eventLoop.makeSucceededFuture(nil)
                    }
                    return channel.eventLoop.makeSucceededFuture(headers)
                },
                upgradePipelineHandler: { channel, head in
                    channel.eventLoop.makeCompletedFuture {
                        let peer = settings.peer(socket: channel.remoteAddress, forwardedFor: head.headers["X-Forwarded-For"].joined(separator: ","),
                                                 forwardedProto: head.headers["X-Forwarded-Proto"].last)
                        let sync = channel.pipeline.syncOperations
                        try sync.addHandler(NIOWebSocketFrameAggregator(
                            minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: 256, maxAccumulatedFrameSize: settings.maxMessageBytes))
                        try sync.addHandler(XMPPWebSocketFramingHandler())
                        try install(channel, peer, .webSocket)
                        return Negotiated.xmpp(channel)
                    }
                }
            )
            var configuration = NIOUpgradableHTTPServerPipelineConfiguration<Negotiated>(upgradeConfiguration: .init(
                upgraders: [upgrader],
                notUpgradingCompletionHandler: { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let sync = channel.pipeline.syncOperations
                        try sync.addHandler(HTTP1ToHTTPServerCodec(secure: settings.tls != nil))
                        try sync.addHandler(HTTPConnectionStateHandler(idleTimeout: .seconds(settings.idleTimeout), logger: logger))
                        let http = try NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>(
                            wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
                        return upgradeAttempted.value ? .refusedUpgrade(http) : .http(http)
                    }
                }
            ))
            configuration.enablePipelining = false
            configuration.enableErrorHandling = false
            configuration.enableResponseHeaderValidation = false
            let negotiated = try sync.configureUpgradableHTTPServerPipeline(configuration: configuration)
            return Value(negotiated: negotiated, channel: channel)
        }
    }

    func handle(value: Value, logger: Logger) async {
        do {
            switch try await value.negotiated.get() {
            case .http(let http):
                await handleHTTP(asyncChannel: http, logger: logger)
            case .refusedUpgrade(let http):
                await Self.refuseUpgrade(http)
            case .xmpp(let channel):
                // The session runs in the pipeline; the server keeps this connection counted until it ends.
                try await channel.closeFuture.get()
            }
        } catch {
            logger.debug("HTTP connection ended", metadata: ["error": "\(error)"])
        }
    }

    /// The response headers for an acceptable XMPP WebSocket upgrade, or nil (RFC 7395 §3.3.1: the
    /// client must offer the `xmpp` subprotocol, and the server must name it).
    static func acceptXMPPUpgrade(_ head: HTTPRequestHead, path: String) -> HTTPHeaders? {
        let requestPath = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
        guard requestPath == path else { return nil }
        let offered = head.headers[canonicalForm: "Sec-WebSocket-Protocol"].map { $0.lowercased() }
        guard offered.contains("xmpp") else { return nil }
        return ["Sec-WebSocket-Protocol": "xmpp"]
    }

    private static func refuseUpgrade(_ http: NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>) async {
        try? await http.executeThenClose { _, outbound in
            let body = "XMPP over WebSocket needs the path of this listener and the 'xmpp' subprotocol (RFC 7395).\n"
            let head = HTTPResponse(status: .badRequest, headerFields: [.connection: "close", .contentType: "text/plain; charset=utf-8",
                                                                       .contentLength: String(body.utf8.count)])
            try await outbound.write(contentsOf: [.head(head), .body(ByteBuffer(string: body)), .end(nil)])
        }
    }
}
