import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StarlingAPI
import StarlingXML

/// XEP-0124/0206 (BOSH) at `/http-bind`. Each session's XMPP stream is an ordinary c2s stream on one end of
/// a local socket pair, so it gets exactly what TCP clients get (authentication, limits, hooks, stream
/// management); this side turns HTTP requests into stream input and the stream's output into responses.
final class BOSHService: Sendable {
    struct Limits: Sendable {
        var maxWait = 60
        var maxHold = 1
        var inactivity = 60
        var maxRequestBytes: Int
        var maxPendingBytes: Int
    }

    private let sessions = NIOLockedValueBox<[String: BOSHSession]>([:])
    private let group: any EventLoopGroup
    private let limits: Limits
    private let installSession: XMPPSessionInstaller
    private let logger: Logger

    init(group: any EventLoopGroup, limits: Limits, installSession: @escaping XMPPSessionInstaller, logger: Logger) {
        self.group = group
        self.limits = limits
        self.installSession = installSession
        self.logger = logger
    }

    /// Browsers post from the web client's origin.
    static let cors: HTTPFields = [
        .accessControlAllowOrigin: "*", .accessControlAllowMethods: "POST, OPTIONS", .accessControlAllowHeaders: "Content-Type",
        .accessControlMaxAge: "86400",
    ]

    func addRoutes(to router: Router<StarlingRequestContext>, settings: HTTPListenerSettings) {
        router.post("/http-bind") { request, context -> Response in
            let data = try await request.body.collect(upTo: self.limits.maxRequestBytes)
            let peer = settings.peer(request, context)
            let answer = await self.handle(String(buffer: data), peer: peer)
            var headers = Self.cors
            headers[.contentType] = "text/xml; charset=utf-8"
            return Response(status: answer.status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: answer.body)))
        }
        router.on("/http-bind", method: .options) { _, _ in Response(status: .noContent, headers: Self.cors) }
        router.get("/http-bind") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; charset=utf-8"],
                     body: .init(byteBuffer: ByteBuffer(string: "XMPP over BOSH (XEP-0124, XEP-0206): POST <body/> elements here.\n")))
        }
    }

    /// One request's `<body/>`: a new session, or the next request of one.
    func handle(_ text: String, peer: HTTPPeer) async -> (status: HTTPResponse.Status, body: String) {
        guard let body = XMLFragmentParser.parse(text, defaultNamespace: BOSHSessionMachine.namespace), body.name == "body",
              body.namespace == BOSHSessionMachine.namespace, let rid = body[attribute: "rid"].flatMap({ Int64($0) }), rid >= 0 else {
            return (.badRequest, BOSHSessionMachine.terminateBody("bad-request"))
        }
        guard let sid = body[attribute: "sid"] else { return await create(body, rid: rid, peer: peer) }
        guard let session = sessions.withLockedValue({ $0[sid] }) else {
            return (.notFound, BOSHSessionMachine.terminateBody("item-not-found"))
        }
        return (.ok, await session.request(BOSHSession.request(body, rid: rid)))
    }

    private func create(_ body: XMLElement, rid: Int64, peer: HTTPPeer) async -> (status: HTTPResponse.Status, body: String) {
        guard let to = body[attribute: "to"], !to.isEmpty else { return (.ok, BOSHSessionMachine.terminateBody("improper-addressing")) }
        let wait = min(max(body[attribute: "wait"].flatMap { Int($0) } ?? limits.maxWait, 1), limits.maxWait)
        let hold = min(max(body[attribute: "hold"].flatMap { Int($0) } ?? 1, 0), limits.maxHold)
        let sid = (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        var header = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='"
        XMLElement.escapeAttribute(to, into: &header)
        header += "' version='1.0' xml:lang='en'>"
        let machine = BOSHSessionMachine(
            settings: .init(wait: wait, hold: hold, inactivity: limits.inactivity, maxPendingBytes: limits.maxPendingBytes),
            streamHeader: header, firstRID: rid)
        let loop = group.next()
        let session = BOSHSession(sid: sid, machine: machine, loop: loop) { [sessions] in
            _ = sessions.withLockedValue { $0.removeValue(forKey: sid) }
        }
        do {
            try await session.connect(peer: peer, installSession: installSession)
        } catch {
            logger.error("BOSH: cannot start a session", metadata: ["error": "\(error)"])
            return (.internalServerError, BOSHSessionMachine.terminateBody("internal-server-error"))
        }
        sessions.withLockedValue { $0[sid] = session }
        let attributes = " sid='\(sid)' wait='\(wait)' hold='\(hold)' requests='\(hold + 1)' inactivity='\(limits.inactivity)' polling='1' ver='1.11'"
            + " secure='\(peer.secure)' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'"
        return (.ok, await session.request(.init(rid: rid, elements: [header]), creationAttributes: attributes))
    }
}

/// One BOSH session: its state machine, the held HTTP requests, and this end of the socket pair whose
/// other end carries the c2s stream. Everything runs on `loop`.
final class BOSHSession: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let sid: String
    let loop: any EventLoop
    private var machine: BOSHSessionMachine
    private let forget: @Sendable () -> Void
    private var channel: (any Channel)?
    /// Reads what the c2s stream writes, element by element.
    private let parser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: 16 * 1024 * 1024, maxDepth: 64))
    private var nextRequestID = 0
    private var waiting: [BOSHSessionMachine.RequestID: EventLoopPromise<String>] = [:]
    private var waitTimers: [BOSHSessionMachine.RequestID: Scheduled<Void>] = [:]
    private var inactivityTimer: Scheduled<Void>?
    /// The stream sent `<stream:error/>`: its end is an error.
    private var streamFailed = false

    init(sid: String, machine: BOSHSessionMachine, loop: any EventLoop, forget: @escaping @Sendable () -> Void) {
        self.sid = sid
        self.machine = machine
        self.loop = loop
        self.forget = forget
    }

    /// Opens the socket pair: this handler on one end, the c2s session (installed by the server) on the other.
    func connect(peer: HTTPPeer, installSession: @escaping XMPPSessionInstaller) async throws {
        var descriptors: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &descriptors) == 0 else {
            throw IOError(errnoCode: errno, reason: "socketpair")
        }
        let stream = ClientBootstrap(group: loop).channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try installSession(channel, peer, .bosh) }
        }
        let own = ClientBootstrap(group: loop).channelInitializer { [self] channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(self) }
        }
        do {
            _ = try await stream.withConnectedSocket(descriptors[1]).get()
        } catch {
            close(descriptors[0])
            throw error
        }
        channel = try await own.withConnectedSocket(descriptors[0]).get()
    }

    static func request(_ body: XMLElement, rid: Int64) -> BOSHSessionMachine.Request {
        BOSHSessionMachine.Request(
            rid: rid,
            elements: body.elements.map { $0.serialized(inheritedNamespace: "") },
            restart: body.attributes.contains { $0.name == "restart" && $0.namespace == "urn:xmpp:xbosh" && ($0.value == "true" || $0.value == "1") },
            terminate: body[attribute: "type"] == "terminate"
        )
    }

    /// Hands a request to the session; returns its answer once there is one.
    func request(_ request: BOSHSessionMachine.Request, creationAttributes: String? = nil) async -> String {
        let answer = loop.flatSubmit { [self] () -> EventLoopFuture<String> in
            let promise = loop.makePromise(of: String.self)
            let id = nextRequestID
            nextRequestID += 1
            waiting[id] = promise
            if let creationAttributes { machine.creationAttributes = creationAttributes }
            perform(machine.received(id, request))
            return promise.futureResult
        }
        return (try? await answer.get()) ?? BOSHSessionMachine.terminateBody("internal-server-error")
    }

    private func perform(_ actions: [BOSHSessionMachine.Action]) {
        var wrote = false
        for action in actions {
            switch action {
            case .forward(let text):
                guard let channel else { continue }
                channel.write(ByteBuffer(string: text), promise: nil)
                wrote = true
            case .respond(let id, let body):
                waitTimers.removeValue(forKey: id)?.cancel()
                waiting.removeValue(forKey: id)?.succeed(body)
            case .startWait(let id, let seconds):
                waitTimers[id] = loop.scheduleTask(in: .seconds(Int64(seconds))) { [self] in perform(machine.waitExpired(id)) }
            case .startInactivity(let seconds):
                inactivityTimer?.cancel()
                inactivityTimer = loop.scheduleTask(in: .seconds(Int64(seconds))) { [self] in perform(machine.inactivityExpired()) }
            case .stopInactivity:
                inactivityTimer?.cancel()
                inactivityTimer = nil
            case .closeStream:
                channel?.flush()
                channel?.close(promise: nil)
            case .forget:
                inactivityTimer?.cancel()
                forget()
            }
        }
        if wrote { channel?.flush() }
    }

    // MARK: The c2s stream's output

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        var events: [XMLStreamEvent] = []
        var failed = false
        buffer.withUnsafeReadableBytes { bytes in
            do throws(XMLStreamError) { try parser.feed(bytes, into: &events) } catch { failed = true }
        }
        for event in events {
            switch event {
            case .streamOpen(let header, _):
                // A restart (after SASL) opens a new document.
                if let id = header[attribute: "id"], let from = header[attribute: "from"], !machine.creationAttributes.contains("authid") {
                    var attributes = " authid='"
                    XMLElement.escapeAttribute(id, into: &attributes)
                    attributes += "' from='"
                    XMLElement.escapeAttribute(from, into: &attributes)
                    machine.creationAttributes += attributes + "'"
                }
            case .stanza(let element):
                if element.name == "error", element.namespace == "http://etherx.jabber.org/streams" { streamFailed = true }
                perform(machine.output(element.serialized(inheritedNamespace: "")))
                // The stream restarts after SASL success with a new document (and a new XML declaration).
                if element.name == "success", element.namespace == "urn:ietf:params:xml:ns:xmpp-sasl" { parser.reset() }
            case .streamClose:
                perform(machine.streamClosed(error: streamFailed))
            }
        }
        if failed { perform(machine.streamClosed(error: true)) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        channel = nil
        perform(machine.streamClosed(error: streamFailed))
        for (_, promise) in waiting { promise.succeed(BOSHSessionMachine.terminateBody("remote-connection-failed")) }
        waiting.removeAll()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
