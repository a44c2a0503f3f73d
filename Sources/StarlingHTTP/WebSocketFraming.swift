import NIOCore
import NIOWebSocket

/// What one WebSocket frame from the client means to an XMPP session (RFC 7395 §3).
enum InboundFrameMeaning: Equatable {
    /// A text message: an XMPP element for the session, with any XML declaration taken off.
    case element(ByteBuffer)
    /// Answer with a pong carrying the same data.
    case ping(ByteBuffer)
    /// The client closes the WebSocket: echo the close and end the connection.
    case close
    /// Ignore (pongs, empty messages).
    case nothing
    /// Not allowed on an XMPP WebSocket: close with this status.
    case refuse(WebSocketErrorCode)

    static func of(_ frame: WebSocketFrame) -> InboundFrameMeaning {
        switch frame.opcode {
        case .text:
            var data = frame.unmaskedData
            dropXMLDeclaration(&data)
            return data.readableBytes == 0 ? .nothing : .element(data)
        case .ping:
            return .ping(frame.unmaskedData)
        case .pong:
            return .nothing
        case .connectionClose:
            return .close
        case .binary:
            // RFC 7395 §3.2: XMPP travels in text frames only.
            return .refuse(.unacceptableData)
        default:
            // Continuation frames were joined by the aggregator; reserved opcodes are a protocol error.
            return .refuse(.protocolError)
        }
    }

    /// Each message is a document of its own and may start with `<?xml …?>`; the session reads all of them
    /// as one document, where a declaration after the start would be an error.
    static func dropXMLDeclaration(_ data: inout ByteBuffer) {
        let whitespace: Set<UInt8> = [0x20, 0x09, 0x0A, 0x0D]
        while let byte = data.getInteger(at: data.readerIndex, as: UInt8.self), whitespace.contains(byte) { data.moveReaderIndex(forwardBy: 1) }
        guard let start = data.getString(at: data.readerIndex, length: min(5, data.readableBytes)), start == "<?xml" else { return }
        guard let view = data.readableBytesView.firstRange(of: Array("?>".utf8)) else { return }
        data.moveReaderIndex(to: view.upperBound)
    }
}

/// Between the WebSocket codec and an XMPP session: each text message goes up as the bytes of one element,
/// each buffer the session writes goes out as one text message (the session writes one element per
/// buffer), a whitespace keepalive becomes a WebSocket ping, and closing the session sends a close frame
/// first.
final class XMPPWebSocketFramingHandler: ChannelDuplexHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = WebSocketFrame

    private var closeSent = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch InboundFrameMeaning.of(frame) {
        case .element(let bytes):
            context.fireChannelRead(wrapInboundOut(bytes))
        case .ping(let payload):
            context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .pong, data: payload)), promise: nil)
        case .close:
            sendClose(context: context, code: .normalClosure)
            context.close(promise: nil)
        case .nothing:
            break
        case .refuse(let code):
            sendClose(context: context, code: code)
            context.close(promise: nil)
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let buffer = unwrapOutboundIn(data)
        if closeSent || buffer.readableBytes == 0 {
            promise?.succeed(())
            return
        }
        if buffer.readableBytesView.allSatisfy({ $0 == 0x20 || $0 == 0x0A }) {
            // RFC 7395 §3.4: no whitespace between elements; a ping keeps the connection alive instead.
            context.write(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .ping, data: context.channel.allocator.buffer(capacity: 0))), promise: promise)
            return
        }
        context.write(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .text, data: buffer)), promise: promise)
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if mode == .all { sendClose(context: context, code: .normalClosure) }
        context.close(mode: mode, promise: promise)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Malformed frames, oversized messages (the aggregator's limit): the connection ends.
        sendClose(context: context, code: error is NIOWebSocketFrameAggregator.Error ? .messageTooLarge : .protocolError)
        context.close(promise: nil)
    }

    private func sendClose(context: ChannelHandlerContext, code: WebSocketErrorCode) {
        guard !closeSent, context.channel.isActive else { return }
        closeSent = true
        var payload = context.channel.allocator.buffer(capacity: 2)
        payload.write(webSocketErrorCode: code)
        context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: payload)), promise: nil)
    }
}
