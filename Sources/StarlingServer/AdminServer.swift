import Foundation
import NIOCore
import NIOPosix
import StarlingConfig
import StarlingHTTP
import StarlingModules

/// The local admin interface `starlingctl` talks to: a Unix socket (mode 0600, so only the server's
/// user) carrying one JSON request per line and one JSON reply per line.
enum AdminProtocol {
    struct Request: Codable {
        var command: String
        var argument: String?
    }

    struct StatusReply: Codable {
        var ok: Bool
        var version: String
        var uptimeSeconds: Double
        var connections: Int
        var sessions: Int
        var residentMemoryBytes: Int?
        /// Plugin images mapped since start; they are never unloaded, so reloads add to this.
        var pluginImages: Int
        var hosts: [String]
        /// Counters of modules that keep them, by "host/module".
        var modules: [String: [String: Int]]
    }

    struct ClusterStatusReply: Codable {
        var ok: Bool
        var cluster: String
        var node: String
        var link: String
        /// Every node: this one first, then its peers as it sees them.
        var nodes: [NodeStatus]
    }

    struct NodeStatus: Codable {
        var node: String
        var link: String?
        /// self, up, down (unreachable, within its grace period) or lost.
        var state: String
        var roundTripMilliseconds: Double?
        var heartbeatAge: Double?
        var sessions: Int
    }

    struct S2SConnection: Codable {
        var direction: String
        var remote: String
        var pairs: [String]
        var address: String
        var tls: Bool
        var ready: Bool
        var method: String?
        var certificateVerified: Bool
        var bidirectional: Bool
        var stanzasIn: Int
        var stanzasOut: Int
    }

    struct S2SReply: Codable {
        var ok: Bool
        var connections: [S2SConnection]
    }

    struct UsersReply: Codable {
        var ok: Bool
        var users: [String]
    }

    struct ReloadReply: Codable {
        var ok: Bool
        var reloaded: [String]
    }

    struct ErrorReply: Codable {
        var ok: Bool
        var error: String
    }
}

/// Splits the inbound byte stream into lines (bounded, since the peer is local but still untrusted).
final class LineDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer
    let maxLength = 64 * 1024

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let newline = buffer.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else {
            if buffer.readableBytes > maxLength { throw AdminLineTooLong() }
            return .needMoreData
        }
        let line = buffer.readSlice(length: newline - buffer.readerIndex)!
        buffer.moveReaderIndex(forwardBy: 1)
        context.fireChannelRead(wrapInboundOut(line))
        return .continue
    }
}

struct AdminLineTooLong: Error {}

final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let server: ServerContext
    private let startedAt: Date

    init(server: ServerContext, startedAt: Date) {
        self.server = server
        self.startedAt = startedAt
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let line = unwrapInboundIn(data)
        let reply: Data
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        do {
            let request = try JSONDecoder().decode(AdminProtocol.Request.self, from: Data(line.readableBytesView))
            switch request.command {
            case "status":
                reply = try encoder.encode(AdminProtocol.StatusReply(
                    ok: true, version: StarlingVersion.current,
                    uptimeSeconds: Date().timeIntervalSince(startedAt),
                    connections: server.connections.count, sessions: server.registry.sessionCount,
                    residentMemoryBytes: ProcessMemory.residentBytes(), pluginImages: PluginLoader.loadedImages, hosts: server.configuration.hosts,
                    modules: server.moduleCounters()
                ))
            case "reload-module", "reload-config", "reload-hooks":
                // Reading files and compiling scripts must not stall this event loop.
                let what: AdminReload = switch request.command {
                case "reload-hooks": .hooks
                case "reload-config": .config(dryRun: request.argument == "dry-run")
                default: .module(request.argument ?? "")
                }
                let server = self.server
                let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                server.threadPool.runIfActive(eventLoop: context.eventLoop) { ServerAdministration.reloadBlocking(what, server: server) }.whenComplete { result in
                    let reply: Data
                    switch result.flatMap({ $0.mapError { $0 as any Error } }) {
                    case .success(let changes):
                        reply = (try? encoder.encode(AdminProtocol.ReloadReply(ok: true, reloaded: changes))) ?? Data()
                    case .failure(let error):
                        reply = (try? encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "\(error)"))) ?? Data()
                    }
                    Self.write(reply, to: bound.value)
                }
                return
            case "purge-uploads":
                // Deleting files is blocking I/O: not on this event loop.
                let server = self.server
                let loop = context.eventLoop
                let bound = NIOLoopBound(context, eventLoop: loop)
                server.threadPool.runIfActive(eventLoop: loop) { () -> [String] in
                    server.configuration.hosts.compactMap { host -> String? in
                        guard let upload = server.router.modules[host]?.modules["http_upload"] as? HTTPUploadModule else { return nil }
                        let purged = upload.purgeExpired()
                        return "\(host): \(purged.files) expired file(s) deleted, \(purged.bytes) bytes"
                    }
                }.whenComplete { result in
                    let lines = (try? result.get()) ?? []
                    let reply = lines.isEmpty
                        ? (try? encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "http_upload is not enabled on any host"))) ?? Data()
                        : (try? encoder.encode(AdminProtocol.ReloadReply(ok: true, reloaded: lines))) ?? Data()
                    Self.write(reply, to: bound.value)
                }
                return
            case "s2s-connections":
                guard let federation = server.router.federation else {
                    reply = try encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "federation is off (no type: s2s listener)"))
                    break
                }
                let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                let loop = context.eventLoop
                loop.makeFutureWithTask { await federation.connections() }.whenSuccess { connections in
                    let rows = connections.map { info in
                        AdminProtocol.S2SConnection(direction: info.direction.rawValue, remote: info.remote, pairs: info.pairs.map(\.description),
                                                    address: info.address, tls: info.tls, ready: info.ready, method: info.method,
                                                    certificateVerified: info.certificateVerified, bidirectional: info.bidirectional, stanzasIn: info.stanzasIn, stanzasOut: info.stanzasOut)
                    }
                    let reply = (try? encoder.encode(AdminProtocol.S2SReply(ok: true, connections: rows))) ?? Data()
                    Self.write(reply, to: bound.value)
                }
                return
            case "connected-users":
                // Every node's sessions: the table is replicated.
                reply = try encoder.encode(AdminProtocol.UsersReply(ok: true, users: server.registry.allResources.map(\.jid.description).sorted()))
            case "join-cluster":
                guard let cluster = server.router.cluster else {
                    reply = try encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "this node is not clustered (no cluster: section)"))
                    break
                }
                guard let peer = request.argument, ClusterConfigurationCheck.isHostAndPort(peer) else {
                    reply = try encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "expected the peer's link as HOST:PORT"))
                    break
                }
                cluster.addPeer(peer)
                reply = try encoder.encode(AdminProtocol.ReloadReply(ok: true, reloaded: ["\(cluster.name) dials \(peer) (until it restarts: add it to cluster.peers to keep it)"]))
            case "leave-cluster":
                guard let settings = server.configuration.cluster else {
                    reply = try encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "this node is not clustered (no cluster: section)"))
                    break
                }
                // Leaving is the graceful shutdown: stop accepting, <system-shutdown/> to every client (they
                // come back through the balancer to the other nodes), goodbye to the peers, deregister.
                reply = try encoder.encode(AdminProtocol.ReloadReply(ok: true, reloaded: ["\(settings.node) is leaving the cluster \(settings.name) and stopping"]))
                Self.write(reply, to: context)
                context.eventLoop.scheduleTask(in: .milliseconds(50)) { kill(getpid(), SIGTERM) }
                return
            case "cluster-status":
                guard let cluster = server.router.cluster, let settings = server.configuration.cluster else {
                    reply = try encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "this node is not clustered (no cluster: section)"))
                    break
                }
                var perNode: [String: Int] = [:]
                for resource in server.registry.allResources { perNode[resource.node ?? settings.node, default: 0] += 1 }
                var nodes = [AdminProtocol.NodeStatus(node: settings.node, link: cluster.linkAddress, state: "self", sessions: perNode[settings.node] ?? 0)]
                for peer in cluster.status() {
                    nodes.append(AdminProtocol.NodeStatus(node: peer.node, link: peer.link, state: peer.state, roundTripMilliseconds: peer.roundTripMilliseconds,
                                                          heartbeatAge: peer.heartbeatAge, sessions: perNode[peer.node] ?? 0))
                }
                reply = try encoder.encode(AdminProtocol.ClusterStatusReply(ok: true, cluster: settings.name, node: settings.node, link: cluster.linkAddress, nodes: nodes))
            default:
                reply = try encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "unknown command '\(request.command)'"))
            }
        } catch {
            reply = (try? encoder.encode(AdminProtocol.ErrorReply(ok: false, error: "bad request: \(error)"))) ?? Data()
        }
        Self.write(reply, to: context)
    }

    private static func write(_ reply: Data, to context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: reply.count + 1)
        buffer.writeBytes(reply)
        buffer.writeInteger(UInt8(ascii: "\n"))
        context.writeAndFlush(NIOAny(buffer), promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

public enum StarlingVersion {
    public static let current = "0.1.0"
}

public enum ProcessMemory {
    /// Resident set size from /proc (Linux); nil elsewhere.
    public static func residentBytes() -> Int? {
        guard let statm = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return nil }
        let fields = statm.split(separator: " ")
        guard fields.count > 1, let pages = Int(fields[1]) else { return nil }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}
