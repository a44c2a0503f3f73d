import Logging
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The PROXY protocol header a load balancer (HAProxy's `send-proxy`/`send-proxy-v2`) puts in front of
/// a connection, naming the client it came from. A plain parser: it reads what has arrived so far and
/// says whether the header is complete.
public enum ProxyHeader {
    /// The client's address, or nil when the balancer speaks for itself (v2 LOCAL, v1 UNKNOWN: its
    /// health checks), in which case the connection's own address stands.
    public struct Source: Sendable, Equatable {
        public var address: String
        public var port: Int
    }

    public enum Outcome: Sendable, Equatable {
        case needMoreData
        /// `length` bytes were the header; what follows is the client's.
        case header(Source?, length: Int)
        case invalid(String)
    }

    static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    static let v1Prefix = Array("PROXY ".utf8)
    /// v1's longest line, CRLF included (the spec's bound).
    static let v1MaxLength = 107

    public static func parse(_ bytes: some Collection<UInt8>) -> Outcome {
        let bytes = Array(bytes.prefix(v2MaxLength))
        if bytes.starts(with: v2Signature.prefix(bytes.count)) || bytes.starts(with: v2Signature) {
            return bytes.count < v2Signature.count ? .needMoreData : parseV2(bytes)
        }
        if bytes.starts(with: v1Prefix.prefix(bytes.count)) || bytes.starts(with: v1Prefix) {
            return bytes.count < v1Prefix.count ? .needMoreData : parseV1(bytes)
        }
        return .invalid("the connection does not start with a PROXY protocol header")
    }

    private static func parseV1(_ bytes: [UInt8]) -> Outcome {
        guard let end = bytes.indices.dropLast().first(where: { bytes[$0] == 0x0D && bytes[$0 + 1] == 0x0A }) else {
            return bytes.count >= v1MaxLength ? .invalid("PROXY v1 line longer than \(v1MaxLength) bytes") : .needMoreData
        }
        guard end + 2 <= v1MaxLength else { return .invalid("PROXY v1 line longer than \(v1MaxLength) bytes") }
        let fields = String(decoding: bytes[..<end], as: UTF8.self).split(separator: " ", omittingEmptySubsequences: false).map(String.init)
        guard fields.count >= 2 else { return .invalid("PROXY v1 line without a protocol") }
        switch fields[1] {
        case "UNKNOWN":
            return .header(nil, length: end + 2)
        case "TCP4", "TCP6":
            guard fields.count == 6, let port = Int(fields[4]), (0...65535).contains(port), Int(fields[5]).map({ (0...65535).contains($0) }) == true,
                  isAddress(fields[2], v6: fields[1] == "TCP6"), isAddress(fields[3], v6: fields[1] == "TCP6") else {
                return .invalid("malformed PROXY v1 line")
            }
            return .header(Source(address: fields[2], port: port), length: end + 2)
        default:
            return .invalid("PROXY v1 protocol '\(fields[1])' is not TCP4, TCP6 or UNKNOWN")
        }
    }

    /// v2 headers longer than this (addresses plus TLVs) are refused rather than buffered.
    static let v2MaxLength = 1024

    private static func parseV2(_ bytes: [UInt8]) -> Outcome {
        guard bytes.count >= 16 else { return .needMoreData }
        guard bytes[12] >> 4 == 2 else { return .invalid("PROXY v2 header of version \(bytes[12] >> 4)") }
        let length = Int(bytes[14]) << 8 | Int(bytes[15])
        guard 16 + length <= v2MaxLength else { return .invalid("PROXY v2 header longer than \(v2MaxLength) bytes") }
        guard bytes.count >= 16 + length else { return .needMoreData }
        let total = 16 + length
        switch bytes[12] & 0x0F {
        case 0:
            // LOCAL: the balancer's own connection (a health check).
            return .header(nil, length: total)
        case 1:
            break
        default:
            return .invalid("PROXY v2 command \(bytes[12] & 0x0F)")
        }
        let block = Array(bytes[16..<total])
        switch bytes[13] {
        case 0x11:
            guard block.count >= 12 else { return .invalid("PROXY v2 IPv4 addresses cut short") }
            let address = block[0..<4].map(String.init).joined(separator: ".")
            return .header(Source(address: address, port: Int(block[8]) << 8 | Int(block[9])), length: total)
        case 0x21:
            guard block.count >= 36 else { return .invalid("PROXY v2 IPv6 addresses cut short") }
            return .header(Source(address: ipv6Text(Array(block[0..<16])), port: Int(block[32]) << 8 | Int(block[33])), length: total)
        case 0x00:
            return .header(nil, length: total)
        default:
            return .invalid("PROXY v2 family/transport 0x\(String(bytes[13], radix: 16)) is not TCP over IPv4 or IPv6")
        }
    }

    private static func isAddress(_ text: String, v6: Bool) -> Bool {
        var storage = in6_addr()
        return text.withCString { inet_pton(v6 ? AF_INET6 : AF_INET, $0, &storage) } == 1
    }

    private static func ipv6Text(_ bytes: [UInt8]) -> String {
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        _ = bytes.withUnsafeBytes { raw in inet_ntop(AF_INET6, raw.baseAddress, &text, socklen_t(text.count)) }
        return String(cString: text)
    }
}

/// Who a proxied connection is from, as the PROXY header said; sent down the pipeline before
/// `channelActive`.
struct ProxiedSource {
    let source: ProxyHeader.Source
}

/// First in the pipeline of a listener with `proxy_protocol: true`: holds the connection back until the
/// header has arrived, tells the handlers behind it the client's address, then steps aside. A connection
/// without a valid header within `timeout` is closed.
final class ProxyProtocolHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private var received: ByteBuffer?
    private let timeout: TimeAmount
    private let logger: Logger
    private var deadline: Scheduled<Void>?

    init(timeout: TimeAmount, logger: Logger) {
        self.timeout = timeout
        self.logger = logger
    }

    func channelActive(context: ChannelHandlerContext) {
        // Passed on once the header names the client.
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        deadline = context.eventLoop.scheduleTask(in: timeout) { [logger] in
            logger.info("no PROXY protocol header in time; closing", metadata: ["peer": "\(bound.value.remoteAddress?.description ?? "?")"])
            bound.value.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if received == nil { received = incoming } else { received!.writeBuffer(&incoming) }
        switch ProxyHeader.parse(received!.readableBytesView) {
        case .needMoreData:
            return
        case .invalid(let reason):
            logger.info("bad PROXY protocol header; closing", metadata: ["peer": "\(context.remoteAddress?.description ?? "?")", "reason": "\(reason)"])
            received = nil
            context.close(promise: nil)
        case .header(let source, let length):
            deadline?.cancel()
            var rest = received!
            received = nil
            rest.moveReaderIndex(forwardBy: length)
            if let source { context.fireUserInboundEventTriggered(ProxiedSource(source: source)) }
            context.fireChannelActive()
            if rest.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(rest)) }
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        context.fireChannelInactive()
    }
}
