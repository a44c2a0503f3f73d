import Logging
import Metrics
import NIOCore
import NIOSSL
import NIOTLS
import StarlingAPI
import StarlingXML

/// Carries out an s2s stream machine's actions on one channel (either direction). All state lives on
/// the channel's event loop; dialback verification and certificate checks come back to it.
/// `@unchecked Sendable`: its state is touched on `loop` only; other threads hop there (`loop.execute`).
final class S2SHandler: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Role {
        case incoming(S2SIncomingMachine)
        case outgoing(S2SOutgoingMachine, OutgoingRoute?)
    }

    private let federation: Federation
    /// The channel's event loop, where everything here happens.
    let loop: any EventLoop
    private var role: Role
    private let parser: XMLStreamParser
    private var context: ChannelHandlerContext?
    /// The peer's address, for logs and limits.
    private(set) var peerAddress = "unknown"
    /// Certificates the peer presented in the TLS handshake, checked once it completes.
    private var peerChain: [NIOSSLCertificate] = []
    /// Events that arrived while the peer's certificate was being checked.
    private var held: [XMLStreamEvent]?
    private var negotiationTimeout: Scheduled<Void>?
    private var keepalive: RepeatedTask?
    private var wroteSinceKeepalive = false
    let openedAt = NIODeadline.now()
    private(set) var stanzasIn = 0
    private(set) var stanzasOut = 0
    private var method: String?
    /// Whether the peer's certificate verified for its domain (nil: no TLS yet, or not checked).
    private var peerVerified: Bool?
    /// Routes for our stanzas that this incoming stream carries (XEP-0288).
    private var bidiRoutes: [OutgoingRoute] = []
    /// Remote domains this incoming stream counts against in `max_incoming_per_domain`.
    private var admitted: Set<String> = []
    /// Per remote domain, once it is known (counters are looked up once, not per stanza).
    private var stanzaCounters: (in: Counter, out: Counter)?

    var isIncoming: Bool {
        if case .incoming = role { return true }
        return false
    }

    private func countStanzas(for domain: String) -> (in: Counter, out: Counter) {
        if let stanzaCounters { return stanzaCounters }
        let counters = (in: Counter(label: "starling_s2s_stanzas_total", dimensions: [("direction", "in"), ("domain", domain)]),
                        out: Counter(label: "starling_s2s_stanzas_total", dimensions: [("direction", "out"), ("domain", domain)]))
        stanzaCounters = counters
        return counters
    }

    init(federation: Federation, role: Role, loop: any EventLoop) {
        self.federation = federation
        self.loop = loop
        self.role = role
        parser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: federation.settings.maxStanzaBytes, maxDepth: federation.settings.maxDepth))
    }

    private var logger: Logger {
        var logger = federation.logger
        logger[metadataKey: "peer"] = "\(peerAddress)"
        switch role {
        case .incoming(let machine): logger[metadataKey: "s2s"] = "in \(machine.remoteDomain ?? "?")"
        case .outgoing(let machine, _): logger[metadataKey: "s2s"] = "out \(machine.pair)"
        }
        return logger
    }

    /// What `starlingctl s2s-connections` shows for this stream.
    func info() -> S2SConnectionInfo {
        switch role {
        case .incoming(let machine):
            return S2SConnectionInfo(direction: .incoming, remote: machine.remoteDomain ?? "?", pairs: machine.authenticated.sorted { $0.description < $1.description },
                                     address: peerAddress, tls: machine.tlsActive, ready: !machine.authenticated.isEmpty, method: method,
                                     certificateVerified: machine.remoteDomain.flatMap { machine.peerIdentity?.covers($0) } ?? false,
                                     bidirectional: !bidiRoutes.isEmpty, stanzasIn: stanzasIn, stanzasOut: stanzasOut)
        case .outgoing(let machine, _):
            return S2SConnectionInfo(direction: .outgoing, remote: machine.pair.remote, pairs: [machine.pair], address: peerAddress, tls: machine.tlsActive,
                                     ready: machine.isReady, method: method, certificateVerified: peerVerified ?? false,
                                     bidirectional: machine.bidirectional, stanzasIn: stanzasIn, stanzasOut: stanzasOut)
        }
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func channelActive(context: ChannelHandlerContext) {
        peerAddress = context.channel.remoteAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? "unknown"
        federation.opened(self)
        let limit = TimeAmount.milliseconds(Int64(federation.settings.negotiationTimeout * 1000))
        negotiationTimeout = context.eventLoop.scheduleTask(in: limit) { [weak self] in
            self?.timedOut()
        }
        let interval = TimeAmount.milliseconds(Int64(federation.settings.keepaliveInterval * 1000))
        keepalive = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { [weak self] _ in
            self?.sendKeepalive()
        }
        if case .outgoing(let machine, _) = role {
            perform(machine.start())
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        var events: [XMLStreamEvent] = []
        do {
            try buffer.withUnsafeReadableBytes { bytes in try parser.feed(bytes, into: &events) }
        } catch let error as XMLStreamError {
            process(events)
            failParsing(error)
            return
        } catch {
            context.close(promise: nil)
            return
        }
        process(events)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls {
            tlsHandshakeCompleted()
            return
        }
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            closeStream(.connectionTimeout, "no traffic for \(Int(federation.settings.idleTimeout)) seconds")
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        negotiationTimeout?.cancel()
        keepalive?.cancel()
        switch role {
        case .incoming(var machine):
            _ = machine.streamClosed()
            role = .incoming(machine)
            for route in bidiRoutes { route.closed(self) }
            bidiRoutes = []
        case .outgoing(var machine, let route):
            let actions = machine.streamClosed()
            role = .outgoing(machine, route)
            for action in actions {
                if case .failed(let failure) = action { route?.failed(failure) }
                if case .verified(let outcome) = action { federation.verificationFinished(self, outcome) }
            }
            route?.closed(self)
        }
        for domain in admitted { federation.releaseIncoming(from: domain) }
        admitted = []
        federation.closed(self)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Servers commonly end TLS without close_notify once the stream is closed: not worth more than debug.
        if let tls = error as? NIOSSLError, case .uncleanShutdown = tls {
            logger.debug("s2s connection closed without TLS close_notify")
        } else {
            logger.info("s2s connection error", metadata: ["error": "\(error)"])
        }
        context.close(promise: nil)
    }

    // MARK: Driving the machine

    private func process(_ events: [XMLStreamEvent]) {
        for (index, event) in events.enumerated() {
            if held != nil {
                held!.append(event)
                continue
            }
            let restarts = handle(event)
            // After STARTTLS or a SASL success the rest of the batch belonged to the old document.
            if restarts {
                if index + 1 < events.count { logger.debug("s2s: bytes after a stream restart were dropped") }
                return
            }
        }
    }

    /// Returns true when the parser was reset (what is still in hand is void).
    private func handle(_ event: XMLStreamEvent) -> Bool {
        switch role {
        case .incoming(var machine):
            let actions: [S2SIncomingMachine.Action]
            if case .streamOpen(let header, _) = event, let from = header[attribute: "from"],
               !federation.allowsStream(with: from, incoming: true, address: peerAddress) {
                actions = machine.streamError(.policyViolation, "this server does not federate with \(from)")
            } else {
                actions = machine.received(event)
            }
            role = .incoming(machine)
            return perform(actions)
        case .outgoing(var machine, let route):
            let actions = machine.received(event)
            role = .outgoing(machine, route)
            return perform(actions)
        }
    }

    private func failParsing(_ error: XMLStreamError) {
        switch role {
        case .incoming(var machine):
            let actions = machine.parseFailed(error)
            role = .incoming(machine)
            perform(actions)
        case .outgoing(var machine, let route):
            let actions = machine.parseFailed(error)
            role = .outgoing(machine, route)
            perform(actions)
        }
    }

    @discardableResult
    private func perform(_ actions: [S2SIncomingMachine.Action]) -> Bool {
        guard let context else { return false }
        var restarted = false
        for action in actions {
            switch action {
            case .send(let text):
                write(text, context: context)
            case .startTLS:
                context.flush()
                startTLS(context: context, server: true)
                restarted = true
            case .resetParser:
                context.flush()
                parser.reset()
                restarted = true
            case .verifyDialback(let request):
                let loop = context.eventLoop
                federation.verify(request).hop(to: loop).whenSuccess { [weak self] outcome in
                    self?.dialbackVerified(request, outcome)
                }
            case .authenticated(let pair, let method):
                negotiationTimeout?.cancel()
                self.method = method
                if !admitted.contains(pair.remote) {
                    guard federation.admitIncoming(from: pair.remote) else {
                        logger.warning("s2s: too many incoming streams from one domain", metadata: ["domain": "\(pair.remote)"])
                        closeStream(.resourceConstraint, "\(pair.remote) already has \(federation.settings.maxIncomingPerDomain) streams open here")
                        return true
                    }
                    admitted.insert(pair.remote)
                }
                logger.notice("s2s: remote domain authenticated", metadata: ["pair": "\(pair)", "method": "\(method)"])
            case .deliver(let stanza):
                received(stanza)
            case .bidirectional(let pair):
                if let route = federation.bidirectional(self, for: pair) {
                    logger.notice("s2s: stream is bidirectional (XEP-0288)", metadata: ["pair": "\(pair)"])
                    bidiRoutes.append(route)
                }
            case .close:
                context.flush()
                context.close(promise: nil)
            }
        }
        context.flush()
        return restarted
    }

    @discardableResult
    private func perform(_ actions: [S2SOutgoingMachine.Action]) -> Bool {
        guard let context, case .outgoing(_, let route) = role else { return false }
        var restarted = false
        for action in actions {
            switch action {
            case .send(let text):
                write(text, context: context)
            case .startTLS:
                startTLS(context: context, server: false)
                restarted = true
            case .resetParser:
                parser.reset()
                restarted = true
            case .ready(let method):
                negotiationTimeout?.cancel()
                self.method = method
                logger.notice("s2s: authenticated to remote domain", metadata: ["method": "\(method)"])
                route?.ready(self)
            case .verified(let outcome):
                federation.verificationFinished(self, outcome)
            case .deliver(let stanza):
                received(stanza)
            case .failed(let failure):
                logger.warning("s2s: outgoing stream failed", metadata: ["reason": "\(failure.reason)"])
                route?.failed(failure)
            case .close:
                context.flush()
                context.close(promise: nil)
            }
        }
        context.flush()
        return restarted
    }

    /// A stanza from the peer that the machine let through: into the server, in `jabber:client`.
    private func received(_ stanza: XMLElement) {
        stanzasIn += 1
        if let domain = stanza[attribute: "from"].flatMap({ JID($0)?.domainpart }) { countStanzas(for: domain).in.increment() }
        if federation.logger.logLevel <= .debug { logger.debug("s2s: stanza in", metadata: ["stanza": "\(stanza.serialized())"]) }
        federation.received(stanza.movingNamespace(Namespace.server, to: Namespace.client))
    }

    private func write(_ text: String, context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: text.utf8.count)
        buffer.writeString(text)
        context.write(wrapOutboundOut(buffer), promise: nil)
        wroteSinceKeepalive = true
    }

    /// A stanza for the remote domain, on a ready outgoing stream or a bidirectional incoming one (the
    /// route checked), on this loop.
    func send(_ stanza: XMLElement) {
        guard let context else { return }
        stanzasOut += 1
        switch role {
        case .outgoing(let machine, _): countStanzas(for: machine.pair.remote).out.increment()
        case .incoming(let machine): if let remote = machine.remoteDomain { countStanzas(for: remote).out.increment() }
        }
        if federation.logger.logLevel <= .debug { logger.debug("s2s: stanza out", metadata: ["stanza": "\(stanza.serialized())"]) }
        write(stanza.movingNamespace(Namespace.client, to: Namespace.server).serialized(inheritedNamespace: Namespace.server), context: context)
        context.flush()
    }

    private func dialbackVerified(_ request: DialbackRequest, _ outcome: DialbackOutcome) {
        guard case .incoming(var machine) = role else { return }
        let actions = machine.dialbackVerified(request, outcome)
        role = .incoming(machine)
        perform(actions)
    }

    // MARK: TLS

    /// Puts TLS under the stream: the peer's certificate is kept whatever it is and checked once the
    /// handshake is done (dialback does not need it to verify).
    private func startTLS(context: ChannelHandlerContext, server: Bool) {
        parser.reset()
        do {
            let handler = try makeTLSHandler(server: server, loop: context.eventLoop)
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
        } catch {
            logger.error("s2s: cannot start TLS", metadata: ["error": "\(error)"])
            context.close(promise: nil)
        }
    }

    /// A TLS handler whose verification callback records the peer's chain (for direct TLS as well).
    func makeTLSHandler(server: Bool, loop: any EventLoop) throws -> any ChannelHandler {
        let record: NIOSSLCustomVerificationCallback = { [weak self] chain, promise in
            loop.assertInEventLoop()
            self?.peerChain = chain
            promise.succeed(.certificateVerified)
        }
        if server {
            return NIOSSLServerHandler(context: federation.serverTLS, customVerificationCallback: record)
        }
        let remote: String
        if case .outgoing(let machine, _) = role { remote = machine.pair.remote } else { remote = "" }
        // SNI names the domain, as XEP-0368 and RFC 6120 §13.7.2.1 expect.
        return try NIOSSLClientHandler(context: federation.clientTLS, serverHostname: remote, customVerificationCallback: record)
    }

    private func tlsHandshakeCompleted() {
        let chain = peerChain
        guard let context else { return }
        let finish: (PeerIdentity?) -> Void = { [weak self] identity in
            guard let self else { return }
            switch role {
            case .incoming(var machine):
                machine.peerIdentity = identity
                role = .incoming(machine)
            case .outgoing(var machine, let route):
                let verified = identity?.covers(machine.pair.remote) ?? false
                peerVerified = verified
                let actions = machine.tlsEstablished(peerVerified: verified)
                role = .outgoing(machine, route)
                perform(actions)
            }
            if let events = held {
                held = nil
                process(events)
            }
        }
        // Incoming: whether to offer SASL EXTERNAL. Outgoing: whether the receiving server is who it says.
        guard !chain.isEmpty, let roots = federation.settings.trustRoots else {
            finish(nil)
            return
        }
        held = []
        let loop = context.eventLoop
        let promise = loop.makePromise(of: PeerIdentity?.self)
        promise.completeWithTask { await roots.identity(of: chain) }
        promise.futureResult.whenSuccess(finish)
    }

    // MARK: Timers

    private func timedOut() {
        switch role {
        case .incoming(let machine) where machine.authenticated.isEmpty:
            closeStream(.connectionTimeout, "negotiation took longer than \(Int(federation.settings.negotiationTimeout)) seconds")
        case .outgoing(let machine, _) where !machine.isReady:
            closeStream(.connectionTimeout, "negotiation took longer than \(Int(federation.settings.negotiationTimeout)) seconds")
        case .incoming, .outgoing:
            break
        }
    }

    /// RFC 6120 §4.6.1: whitespace keeps NATs and the peer's idle timer from closing a quiet stream.
    private func sendKeepalive() {
        guard let context else { return }
        if !wroteSinceKeepalive { write(" ", context: context); context.flush() }
        wroteSinceKeepalive = false
    }

    /// Ends the stream from our side (idle, timeout, shutdown).
    func closeStream(_ condition: StreamErrorCondition?, _ text: String?) {
        switch role {
        case .incoming(var machine):
            let actions = machine.streamError(condition ?? .systemShutdown, text)
            role = .incoming(machine)
            perform(actions)
        case .outgoing(var machine, let route):
            let actions = machine.close(condition, text)
            role = .outgoing(machine, route)
            perform(actions)
        }
    }
}
