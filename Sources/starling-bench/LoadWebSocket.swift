import ArgumentParser
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// How a load connection reaches the server.
enum LoadTransport: String, ExpressibleByArgument, Sendable {
    /// XMPP over TCP (RFC 6120).
    case tcp
    /// XMPP over WebSocket (RFC 7395), upgraded from HTTP/1.1 (over TLS with `--tls direct`).
    case websocket
}

/// Sets up the HTTP upgrade to an XMPP WebSocket at `path`; once upgraded, the frames are translated by
/// `LoadWebSocketFraming` and `connection` takes over as on TCP.
func configureWebSocket(_ channel: any Channel, host: String, path: String, connection: LoadConnection) throws {
    let upgrader = NIOTypedWebSocketClientUpgrader<Void>(maxFrameSize: 1 << 20) { channel, _ in
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(LoadWebSocketFraming())
            try channel.pipeline.syncOperations.addHandler(connection)
        }
    }
    var headers = HTTPHeaders()
    headers.add(name: "Host", value: host)
    headers.add(name: "Sec-WebSocket-Protocol", value: "xmpp")
    let request = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: headers)
    let configuration = NIOTypedHTTPClientUpgradeConfiguration<Void>(
        upgradeRequestHead: request, upgraders: [upgrader],
        notUpgradingCompletionHandler: { channel in
            channel.eventLoop.makeFailedFuture(LoadError(reason: "the server refused the WebSocket upgrade at \(path)"))
        }
    )
    let upgraded = try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(configuration: .init(upgradeConfiguration: configuration))
    upgraded.whenComplete { result in
        switch result {
        case .success: connection.webSocketUpgraded()
        case .failure: channel.close(promise: nil)
        }
    }
}

/// Client side of RFC 7395 framing for the generator: each text message in is handed on as bytes, each
/// buffer written goes out as one masked text message.
final class LoadWebSocketFraming: ChannelDuplexHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = WebSocketFrame

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .text:
            context.fireChannelRead(wrapInboundOut(frame.unmaskedData))
        case .ping:
            context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: frame.unmaskedData)), promise: nil)
        case .connectionClose:
            context.close(promise: nil)
        default:
            break
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let buffer = unwrapOutboundIn(data)
        context.write(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .text, maskKey: .random(), data: buffer)), promise: promise)
    }
}
