import Logging
import NIOCore
import NIOSSL
import NIOTLS
import StarlingAPI
import StarlingFAST
import StarlingCluster
import StarlingHTTP
import StarlingSASL
import StarlingStorage
import StarlingXML

/// How a client's connection reaches its `C2SHandler`.
enum C2STransport {
    /// A TCP connection of a c2s listener, with TLS from the first byte or not.
    case tcp(directTLS: Bool)
    /// A WebSocket (RFC 7395) of an HTTP listener; the handler is added once the upgrade is done.
    case webSocket(HTTPPeer)
    /// A BOSH session (XEP-0206) of an HTTP listener: a plain stream from the other end of a socket pair.
    case bosh(HTTPPeer)
}

/// Carries out the c2s state machine's actions on one channel. All state lives on the channel's event
/// loop; storage and password hashing run elsewhere and come back to the loop with their result.
final class C2SHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let server: ServerContext
    private var machine: C2SStateMachine
    private let parser: XMLStreamParser
    private var context: ChannelHandlerContext?
    private var session: ClientSession?
    private var remoteAddress = "unknown"
    private var proxiedSource: ProxyHeader.Source?
    /// When the TLS handshake under way began (direct TLS: the connection; STARTTLS: `<proceed/>`).
    private var tlsHandshakeStarted: ContinuousClock.Instant?
    /// A direct TLS connection: its handshake starts with the connection.
    private let directTLSHandshake: Bool
    private var remotePort = 0
    private var authenticatedUser: JID?
    /// The login being checked, for the login-failed hook.
    private var currentLogin: LoginEvent?
    private var refusedByPolicy = false
    /// Counted in `server.addressLimits` until it closes, and as unauthenticated until it authenticates.
    private var countedByAddress = false
    private var countedUnauthenticated = false
    /// How the client connects, for the metrics of open connections.
    private let transportMetric: ServerMetrics.Transport
    /// XEP-0198 on this stream, and its id when resumable.
    private var sm = StreamManagement()
    /// `max_queue` of the host's stream management, read when it is enabled.
    private var smQueueLimit = Int.max
    /// The connection dropped while resumable: the session waits here for a resumption or its timeout.
    private var detached = false
    private var detachTimeout: Scheduled<Void>?
    /// The session was resumed on another connection: what still reaches this one goes there.
    private var resumedBy: ClientSession?
    /// The session was resumed on another node: what still reaches this one is routed again (to it).
    private var movedAway: JID?
    /// While this connection resumes a session: deliveries that came before the old one handed over.
    private var resumingDeliveries: [OutgoingStanza]?
    /// Built when something is logged rather than kept per connection: most connections never log.
    private var logger: Logger {
        var logger = server.logger
        logger[metadataKey: "peer"] = "\(remoteAddress):\(remotePort)"
        if let authenticatedUser { logger[metadataKey: "user"] = "\(authenticatedUser)" }
        return logger
    }

    /// Events that arrived while an asynchronous step (lookup, hashing, failure delay) was in flight;
    /// they are processed in order once it finishes.
    private var queued: [XMLStreamEvent] = []
    private static let maxQueuedEvents = 64
    private var queuedParseError: XMLStreamError?
    private var waiting = false
    /// Set when the parser was reset: events still in hand belong to the old document.
    private var discardRemainingEvents = false

    private var inReadBurst = false
    private var flushPending = false
    private var flushScheduled = false
    private var authTimeout: Scheduled<Void>?
    /// We pinged an idle client and it has not sent anything since.
    private var pingOutstanding = false
    /// Something was written since the keepalive timer last looked; without it, a bound session gets a
    /// whitespace keepalive (RFC 6120 §4.6.1).
    private var wroteSinceKeepalive = false
    private var keepalive: RepeatedTask?
    /// Holds on reading from this client (module backpressure, the read rate); reading stops while any is held.
    private var readHolds = 0
    /// `limits.read_rate` as a token bucket, in bytes; a negative balance pauses reading until it is repaid.
    private var readTokens = 0.0
    private var readRefilled = NIODeadline.now()
    private var rateHeld = false

    init(server: ServerContext, settings: C2SSettings, transport: C2STransport) {
        self.server = server
        self.parser = XMLStreamParser(limits: XMLStreamLimits(
            maxStanzaBytes: server.configuration.limits.maxStanzaSize,
            maxDepth: server.configuration.limits.maxDepth
        ))
        switch transport {
        case .tcp: transportMetric = .tcp
        case .webSocket: transportMetric = .websocket
        case .bosh: transportMetric = .bosh
        }
        switch transport {
        case .tcp(let directTLS):
            directTLSHandshake = directTLS
            machine = C2SStateMachine(settings: settings, tlsActive: directTLS, channelBinding: directTLS ? server.tls.channelBinding : nil)
        case .bosh(let peer):
            directTLSHandshake = false
            machine = C2SStateMachine(settings: settings, tlsActive: peer.secure)
            proxiedSource = .init(address: peer.address, port: peer.port)
        case .webSocket(let peer):
            directTLSHandshake = false
            machine = C2SStateMachine(settings: settings, tlsActive: peer.secure, framing: .webSocket)
            proxiedSource = .init(address: peer.address, port: peer.port)
            // Every message is one element: the parser reads them all as the children of one document
            // whose root never arrives from the client. `<open/>` and `<close/>` are children like stanzas.
            _ = try? parser.feed("<websocket xmlns='\(Namespace.client)'>")
        }
        readTokens = Double(server.configuration.limits.readBurst)
    }

    /// Stanzas declare `jabber:client` themselves on WebSocket, where each message is a document of its own.
    private var inheritedNamespace: String {
        machine.framing == .stream ? Namespace.client : ""
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // A WebSocket session starts on a connection that is already up.
        if machine.framing == .webSocket, context.channel.isActive { start(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        start(context: context)
        context.fireChannelActive()
    }

    private func start(context: ChannelHandlerContext) {
        remoteAddress = proxiedSource?.address ?? context.remoteAddress?.ipAddress ?? "unknown"
        remotePort = proxiedSource?.port ?? context.remoteAddress?.port ?? 0
        machine.refusedMechanisms = server.router.refusedMechanisms(for: remoteAddress, on: server.configuration.hosts[0])
        // Connection policies (rate limits per address): refused before any byte is read.
        if case .reject = server.router.run(.connectionOpened, ConnectionEvent(address: remoteAddress), on: server.configuration.hosts[0]) {
            logger.info("connection refused by policy")
            ServerMetrics.refused[.policy]?.increment()
            refusedByPolicy = true
            context.close(promise: nil)
            return
        }
        if let refusal = server.addressLimits.open(remoteAddress) {
            logger.notice("connection refused: \(refusal.rawValue)", metadata: ["address": "\(remoteAddress)"])
            ServerMetrics.refused[.init(refusal)]?.increment()
            refusedByPolicy = true
            context.close(promise: nil)
            return
        }
        countedByAddress = true
        countedUnauthenticated = true
        ServerMetrics.connections[transportMetric]?.increment()
        if directTLSHandshake { tlsHandshakeStarted = .now }
        let loop = context.eventLoop
        let id = ObjectIdentifier(self)
        let bound = NIOLoopBound(self, eventLoop: loop)
        server.connections.insert(id) {
            loop.execute { bound.value.perform(bound.value.machine.shuttingDown()) }
        }
        authTimeout = loop.scheduleTask(in: .milliseconds(Int64(server.configuration.limits.authTimeout * 1000))) {
            bound.value.perform(bound.value.machine.authenticationTimedOut())
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if tlsHandshakeStarted != nil { finishTLSHandshake(.abandoned) }
        if countedByAddress {
            countedByAddress = false
            server.addressLimits.closed(remoteAddress, authenticated: !countedUnauthenticated)
            countedUnauthenticated = false
            ServerMetrics.connections[transportMetric]?.decrement()
        }
        authTimeout?.cancel()
        keepalive?.cancel()
        server.connections.remove(ObjectIdentifier(self))
        // A resumable stream that ended without </stream> (a phone changing networks) keeps its session.
        if let session, sm.resumable, !machine.isClosed, let smID = sm.id, let timeout = streamManagementSettings(for: session.jid.domainpart)?.resumeTimeout {
            detach(session, id: smID, timeout: timeout, loop: context.eventLoop)
            self.context = nil
            context.fireChannelInactive()
            return
        }
        if let session {
            server.registry.unbind(session)
            _ = server.router.run(.sessionClosed, SessionEvent(jid: session.jid), on: session.jid.domainpart)
            logger.debug("session closed", metadata: ["jid": "\(session.jid)"])
        }
        session = nil
        self.context = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        if machine.isClosed || refusedByPolicy { return }
        chargeRead(buffer.readableBytes)
        pingOutstanding = false
        inReadBurst = true
        var parseError: XMLStreamError?
        var events: [XMLStreamEvent] = []
        buffer.withUnsafeReadableBytes { bytes in
            do throws(XMLStreamError) { try parser.feed(bytes, into: &events) } catch { parseError = error }
        }
        discardRemainingEvents = false
        for event in events {
            if discardRemainingEvents { break }
            if waiting {
                // A client that keeps sending while we wait on storage or a failure delay must not make us
                // buffer without bound.
                guard queued.count < Self.maxQueuedEvents else {
                    perform(machine.fail(.policyViolation, "too many stanzas while authentication is pending"))
                    return
                }
                queued.append(event)
            } else {
                handle(event)
            }
        }
        if let parseError, !discardRemainingEvents {
            if waiting { queuedParseError = parseError } else { perform(machine.parseFailed(parseError)) }
        }
    }

    /// Takes `bytes` from the read-rate bucket; when it runs dry, reading pauses for as long as the
    /// debt takes to repay at the configured rate.
    private func chargeRead(_ bytes: Int) {
        let limits = server.configuration.limits
        guard limits.readRate > 0, let context else { return }
        let now = NIODeadline.now()
        let elapsed = Double((now - readRefilled).nanoseconds) / 1e9
        readRefilled = now
        readTokens = min(Double(limits.readBurst), readTokens + elapsed * Double(limits.readRate)) - Double(bytes)
        guard readTokens < 0, !rateHeld else { return }
        rateHeld = true
        holdReads(true)
        let wait = TimeAmount.nanoseconds(Int64(-readTokens / Double(limits.readRate) * 1e9))
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: wait) {
            bound.value.rateHeld = false
            bound.value.holdReads(false)
        }
    }

    private func holdReads(_ held: Bool) {
        readHolds += held ? 1 : -1
        guard let context, readHolds == (held ? 1 : 0) else { return }
        context.channel.setOption(ChannelOptions.autoRead, value: !held).whenSuccess {
            if !held { context.read() }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inReadBurst = false
        // Most bound sessions are idle most of the time: between reads they keep no parser state.
        if session != nil, !waiting { parser.releaseBetweenStanzas() }
        if flushPending {
            flushPending = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // A load balancer's PROXY header named the client (this comes before `channelActive`).
        if let proxied = event as? ProxiedSource {
            proxiedSource = proxied.source
            return
        }
        if let tlsEvent = event as? TLSUserEvent, case .handshakeCompleted = tlsEvent {
            finishTLSHandshake(.success)
            if !machine.tlsActive { perform(machine.tlsEstablished(channelBinding: server.tls.channelBinding)) }
            return
        }
        if let idle = event as? IdleStateHandler.IdleStateEvent {
            switch idle {
            case .read:
                // Half the idle timeout without a byte: ping (XEP-0199 §4.2); a second half: gone.
                if let session, !pingOutstanding {
                    pingOutstanding = true
                    var ping = XMLElement(name: "iq", namespace: Namespace.client, attributes: [
                        "type": "get", "id": "starling-ping", "from": session.jid.domainpart, "to": session.jid.description,
                    ])
                    ping.append(XMLElement(name: "ping", namespace: Namespace.ping))
                    deliver(.element(ping))
                } else {
                    perform(machine.idleTimedOut())
                }
            case .write, .all:
                break
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if tlsHandshakeStarted != nil { finishTLSHandshake(.failure) }
        logger.debug("connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }

    private func finishTLSHandshake(_ result: ServerMetrics.HandshakeResult) {
        guard let started = tlsHandshakeStarted else { return }
        tlsHandshakeStarted = nil
        ServerMetrics.tlsHandshakes[result]?.increment()
        if result == .success { ServerMetrics.tlsHandshakeDuration.record(duration: .now - started) }
    }

    // MARK: Carrying out actions

    private func handle(_ event: XMLStreamEvent) {
        switch (machine.framing, event) {
        case (.stream, .streamOpen(let header, let defaultNamespace)):
            perform(machine.streamOpened(header: header, defaultNamespace: defaultNamespace))
        case (.stream, .stanza(let element)):
            perform(machine.elementReceived(element))
        case (.stream, .streamClose), (.webSocket, .streamClose):
            perform(machine.streamClosed())
        case (.webSocket, .streamOpen):
            // The document root the handler itself supplied.
            break
        case (.webSocket, .stanza(let element)) where element.namespace == C2SFraming.namespace && element.name == "open":
            perform(machine.streamOpened(header: element, defaultNamespace: nil))
        case (.webSocket, .stanza(let element)) where element.namespace == C2SFraming.namespace && element.name == "close":
            perform(machine.streamClosed())
        case (.webSocket, .stanza(let element)):
            perform(machine.elementReceived(element))
        }
    }

    private func perform(_ actions: [C2SStateMachine.Action]) {
        guard let context else { return }
        for action in actions {
            switch action {
            case .send(let text):
                write(text)
            case .sendElement(let element):
                // Stanzas on a bound stream are counted for stream management like any delivery.
                if session != nil, ["message", "presence", "iq"].contains(element.name), element.namespace == Namespace.client {
                    deliver(.element(element))
                } else {
                    write(element.serialized(inheritedNamespace: inheritedNamespace))
                }
            case .startTLS:
                context.flush()
                let handler = NIOSSLServerHandler(context: server.tls.context)
                tlsHandshakeStarted = .now
                discardRemainingEvents = true
                parser.reset()
                do { try context.pipeline.syncOperations.addHandler(handler, position: .first) } catch {
                    logger.error("cannot start TLS", metadata: ["error": "\(error)"])
                    context.close(promise: nil)
                }
            case .resetParser:
                // On WebSocket the next `<open/>` is just the next message of the same document.
                guard machine.framing == .stream else { continue }
                discardRemainingEvents = true
                parser.reset()
            case .lookUpCredentials(let username, let host):
                suspend()
                if refuseLockedOutLogin(username: username, host: host) { continue }
                if refuseLogin(username: username, host: host, mechanism: "SCRAM") {
                    // Looks like an unknown account to the client: the exchange fails at its end.
                    perform(machine.credentialsLoaded(nil))
                    resume()
                    continue
                }
                let accounts = server.accounts
                let future = context.eventLoop.makeFutureWithTask { try await accounts.credentials(username: username, host: host) }
                future.whenComplete { result in
                    switch result {
                    case .success(let credentials): self.perform(self.machine.credentialsLoaded(credentials))
                    case .failure(let error): self.storageFailed(error)
                    }
                    self.resume()
                }
            case .verifyPlain(let username, let host, let password):
                suspend()
                if refuseLockedOutLogin(username: username, host: host) { continue }
                if refuseLogin(username: username, host: host, mechanism: "PLAIN") {
                    perform(machine.plainVerified(username: username, success: false))
                    resume()
                    continue
                }
                let accounts = server.accounts
                let pool = server.threadPool
                let moduleCheck = server.router.modules[host]?.passwordCheck
                let request = PasswordRequest(username: username, host: host, password: password, address: remoteAddress)
                let future = context.eventLoop.makeFutureWithTask { () async throws -> Bool in
                    // auth.method names a module: it decides, off the event loop.
                    if let moduleCheck { return try await moduleCheck(request) }
                    let stored = try await accounts.credentials(username: username, host: host)
                    let credential = stored.flatMap { $0.first(where: { $0.hash == .sha256 }) ?? $0.first }
                    // PBKDF2 takes milliseconds: keep it off the event loops and the cooperative pool. An
                    // unknown account costs the same, so timing does not tell which accounts exist.
                    let valid = try await pool.runIfActive {
                        guard let credential else {
                            _ = SCRAMCredentials.derive(password: password, hash: .sha256, salt: [0], iterations: 4096)
                            return false
                        }
                        return credential.verify(password: password)
                    }
                    // An imported account may have keys for SCRAM-SHA-1 only: with the password at hand, the
                    // other hashes' keys are made, so its clients can use SCRAM-SHA-256 from now on.
                    if valid, let stored, let credential {
                        let missing = SCRAMHash.allCases.filter { hash in !stored.contains { $0.hash == hash } }
                        if !missing.isEmpty {
                            let added = try await pool.runIfActive {
                                missing.map { SCRAMCredentials.generate(password: password, hash: $0, iterations: credential.iterations) }
                            }
                            try? await accounts.setCredentials(username: username, host: host, credentials: stored + added)
                        }
                    }
                    return valid
                }
                future.whenComplete { result in
                    switch result {
                    case .success(let valid): self.perform(self.machine.plainVerified(username: username, success: valid))
                    case .failure(let error): self.storageFailed(error)
                    }
                    self.resume()
                }
            case .verifyToken(let request):
                suspend()
                let (username, host) = (request.user.localpart ?? "", request.user.domainpart)
                if refuseLockedOutLogin(username: username, host: host) { continue }
                if refuseLogin(username: username, host: host, mechanism: request.mechanism) {
                    perform(machine.tokenVerified(.failure(.notAuthorized)))
                    resume()
                    continue
                }
                guard let tokens = server.fastTokens else {
                    perform(machine.tokenVerified(.failure(.temporaryAuthFailure)))
                    resume()
                    continue
                }
                context.eventLoop.makeFutureWithTask { try await tokens.verify(request) }.whenComplete { result in
                    switch result {
                    case .success(let outcome): self.perform(self.machine.tokenVerified(outcome))
                    case .failure(let error): self.storageFailed(error)
                    }
                    self.resume()
                }
            case .issueToken(let request):
                guard let tokens = server.fastTokens else {
                    perform(machine.tokenIssued(nil))
                    continue
                }
                suspend()
                let logger = self.logger
                context.eventLoop.makeFutureWithTask { () async -> IssuedFASTToken? in
                    do { return try await tokens.issue(request) } catch {
                        // The login itself succeeded: it goes on without a token, and the client keeps its password.
                        logger.warning("cannot store a FAST token", metadata: ["error": "\(error)"])
                        return nil
                    }
                }.whenSuccess { token in
                    self.perform(self.machine.tokenIssued(token))
                    self.resume()
                }
            case .authenticationFailed(let reply):
                if let login = currentLogin { _ = server.router.run(.loginFailed, login, on: login.host) }
                ServerMetrics.login(mechanism: currentLogin?.mechanism ?? "other", succeeded: false)
                suspend()
                let account = currentLogin.map { Self.account($0.username, $0.host) }
                let delay = server.failures.recordFailure(address: remoteAddress, account: account)
                // One line per failure with the client's address: what examples/fail2ban matches.
                logger.info("authentication failed", metadata: ["address": "\(remoteAddress)", "account": "\(account ?? "?")", "delay": "\(delay)"])
                context.eventLoop.scheduleTask(in: .milliseconds(Int64(delay * 1000))) {
                    self.write(reply.serialized(inheritedNamespace: self.inheritedNamespace))
                    self.flushSoon()
                    self.resume()
                }
            case .authenticated(let user):
                server.failures.recordSuccess(address: remoteAddress, account: user.bare.description)
                ServerMetrics.login(mechanism: currentLogin?.mechanism ?? "other", succeeded: true)
                if countedUnauthenticated {
                    countedUnauthenticated = false
                    server.addressLimits.authenticated(remoteAddress)
                }
                authenticatedUser = user
                logger.debug("authenticated")
            case .bindResource(let user, let requested, let iq):
                bind(user: user, requested: requested, iq: iq)
            case .bind2Bound(let success, let inline):
                finishBind2(success, inline: inline)
            case .resumeSession(let user, let previd, let h):
                resumeSession(user: user, previd: previd, h: h)
            case .route(let stanza):
                sm.received()
                ServerMetrics.received.count(stanza.name)
                if let session { server.router.route(stanza, from: session) }
            case .nonza(let element):
                guard let session else { continue }
                if element.namespace == StreamManagement.namespace {
                    streamManagement(element, session: session)
                    continue
                }
                switch server.router.run(.nonzaFromClient, StanzaEvent(stanza: element, origin: session.jid), on: session.jid.domainpart) {
                case .handled, .modify:
                    break
                case .pass, .reject, .refuse:
                    perform(machine.fail(.unsupportedStanzaType, "<\(element.name) xmlns='\(element.namespace)'/> is not supported"))
                    return
                }
            case .preAuthIQ(let iq):
                let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
                let loop = context.eventLoop
                let event = PreAuthIQEvent(stanza: iq, domain: machine.host, address: remoteAddress) { reply in
                    loop.execute {
                        bound.value.write(reply.serialized(inheritedNamespace: bound.value.inheritedNamespace))
                        bound.value.flushSoon()
                    }
                }
                if server.router.run(.preAuthIQ, event, on: machine.host) == .pass {
                    write(iq.errorReply(.serviceUnavailable).serialized(inheritedNamespace: inheritedNamespace))
                }
            case .close:
                let closeContext = context
                closeContext.writeAndFlush(wrapOutboundOut(closeContext.channel.allocator.buffer(capacity: 0))).whenComplete { _ in
                    closeContext.close(promise: nil)
                }
                authTimeout?.cancel()
                return
            }
        }
        flushSoon()
    }

    /// `user@host` as the failure tracker keys accounts (normalised when it is a valid JID).
    private static func account(_ username: String, _ host: String) -> String {
        (try? JID(localpart: username, domainpart: host))?.bare.description ?? "\(username)@\(host)"
    }

    /// When the account failed too often lately and this address never logged in to it, answers
    /// `<temporary-auth-failure/>` (after the address's failure delay) without looking at the password,
    /// and returns true. The attempt counts as a failure, so an attack that goes on keeps the lock.
    private func refuseLockedOutLogin(username: String, host: String) -> Bool {
        let account = Self.account(username, host)
        guard let context, server.failures.isLockedOut(account: account, address: remoteAddress) else { return false }
        let delay = server.failures.recordFailure(address: remoteAddress, account: account)
        logger.warning("authentication failed: too many failures for this account", metadata: [
            "address": "\(remoteAddress)", "account": "\(account)", "delay": "\(delay)",
        ])
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: .milliseconds(Int64(delay * 1000))) {
            bound.value.perform(bound.value.machine.authenticationUnavailable())
            bound.value.resume()
        }
        return true
    }

    /// Runs the login-attempt hooks; true when a policy refuses the attempt.
    private func refuseLogin(username: String, host: String, mechanism: String) -> Bool {
        let login = LoginEvent(username: username, host: host, address: remoteAddress, mechanism: mechanism)
        currentLogin = login
        if let user = try? JID(localpart: username, domainpart: host), !server.router.allowsLogin(user, from: remoteAddress) {
            logger.info("login refused by the access rules (auth.access)", metadata: ["username": "\(username)"])
            return true
        }
        guard case .reject = server.router.run(.loginAttempt, login, on: host) else { return false }
        logger.info("login refused by policy", metadata: ["username": "\(username)"])
        return true
    }

    private func bind(user: JID, requested: String?, iq: XMLElement) {
        guard let context else { return }
        let loop = context.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        var created: ClientSession?
        let outcome = server.registry.bind(user: user, resource: requested, maxSessions: server.configuration.limits.maxSessionsPerUser) { jid in
            let session = ClientSession(
                jid: jid, eventLoop: loop,
                deliver: { stanza in bound.value.deliver(stanza) },
                close: { condition in bound.value.closeSession(condition) },
                hold: { held in bound.value.holdReads(held) }
            )
            created = session
            return session
        }
        switch outcome {
        case .bound(let jid, let replaced):
            session = created
            // A session on another node hears of this binding through the session table and closes itself.
            if case .local(let old)? = replaced { old.close(.conflict) }
            authTimeout?.cancel()
            startKeepalive(loop: loop)
            logger.debug("resource bound", metadata: ["jid": "\(jid)"])
            perform(machine.resourceBound(jid, iq: iq))
            _ = server.router.run(.sessionBound, SessionEvent(jid: jid), on: jid.domainpart)
        case .failed(let condition):
            perform(machine.bindFailed(condition, iq: iq))
        }
    }

    /// XEP-0386 §5: what the Bind2 request enabled inline, done before `<success/>` goes out: stream
    /// management here (its `<enabled/>` goes into `<bound/>`), a module's `<enable/>` IQ (carbons) through the
    /// module's own handler, a nonza (client state) through the nonza hook. Reading waits until all are done.
    private func finishBind2(_ success: XMLElement, inline: [XMLElement]) {
        guard let session, let context else { return }
        let host = session.jid.domainpart
        var answers: [XMLElement] = []
        var moduleRequests: [(handler: IQHandler, element: XMLElement)] = []
        for element in inline {
            if element.namespace == StreamManagement.namespace {
                switch streamManagementReceived(element, host: host) {
                case .send(let answer): answers.append(answer)
                case .streamError, .nothing: answers.append(StreamManagement.failed(.badRequest))
                }
            } else if let entry = server.router.modules[host]?.iqHandlers[ModuleRegistrar.IQKey(type: .set, name: element.name, namespace: element.namespace)] {
                moduleRequests.append((entry.handler, element))
            } else {
                _ = server.router.run(.nonzaFromClient, StanzaEvent(stanza: element, origin: session.jid), on: host)
            }
        }
        let send = { (handler: C2SHandler) in
            var success = success
            if let index = success.children.firstIndex(where: { if case .element(let child) = $0 { return child.name == "bound" } else { return false } }) {
                var bound = XMLElement(name: "bound", namespace: SASL2.bind2)
                for answer in answers { bound.append(answer) }
                success.children[index] = .element(bound)
            }
            handler.writeElement(success)
            handler.flushSoon()
        }
        guard !moduleRequests.isEmpty else { return send(self) }
        suspend()
        let jid = session.jid
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let done = context.eventLoop.makePromise(of: Void.self)
        done.completeWithTask {
            for (handler, element) in moduleRequests {
                var iq = XMLElement(name: "iq", namespace: Namespace.client, attributes: ["type": "set", "id": "bind2-inline"])
                iq.append(element)
                // What the module says is not the client's to see: Bind2 has no place for it but <bound/>.
                _ = try? await handler(IQRequest(stanza: iq, from: jid, to: jid.bare))
            }
        }
        done.futureResult.whenComplete { _ in
            send(bound.value)
            bound.value.resume()
        }
    }

    private func startKeepalive(loop: any EventLoop) {
        let bound = NIOLoopBound(self, eventLoop: loop)
        let interval = TimeAmount.milliseconds(Int64(server.configuration.limits.keepaliveInterval * 1000))
        keepalive = loop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in bound.value.keepaliveTick() }
    }

    // MARK: Stream management (XEP-0198)

    /// The host's `stream_management` module options, or nil where the module is not enabled.
    private func streamManagementSettings(for host: String) -> (resumeTimeout: Int, maxQueue: Int)? {
        guard let options = server.router.modules[host]?.adapters["stream_management"]?.options else { return nil }
        let timeout = options.integer("resume_timeout")
        return (timeout, options.integer("max_queue"))
    }

    private func streamManagement(_ element: XMLElement, session: ClientSession) {
        switch streamManagementReceived(element, host: session.jid.domainpart) {
        case .send(let answer): writeElement(answer)
        case .streamError(let condition, let text): return perform(machine.fail(condition, text))
        case .nothing: break
        }
        flushSoon()
    }

    /// A stream management element from the bound client (a nonza, or inline in Bind2), counted and answered.
    private func streamManagementReceived(_ element: XMLElement, host: String) -> StreamManagement.Answer {
        let settings = streamManagementSettings(for: host)
        let node = server.configuration.cluster?.node
        let answer = sm.received(element, resumeTimeout: settings?.resumeTimeout, newID: { ResumptionID.make(random: Self.streamID(), node: node) })
        if sm.enabled, let settings { smQueueLimit = settings.maxQueue }
        return answer
    }

    private func writeElement(_ element: XMLElement) {
        write(element.serialized(inheritedNamespace: inheritedNamespace))
    }

    /// 128 random bits: the resumption id is the only thing that names a detached session.
    private static func streamID() -> String {
        (0..<2).map { _ in String(UInt64.random(in: 0...UInt64.max), radix: 36) }.joined(separator: "-")
    }

    /// The connection is gone but the session stays bound, collecting what is sent to it, until a new
    /// connection of the same account resumes it or `timeout` seconds pass.
    private func detach(_ session: ClientSession, id: String, timeout: Int, loop: any EventLoop) {
        detached = true
        let bound = NIOLoopBound(self, eventLoop: loop)
        server.detached.insert(id, jid: session.jid, handOver: { newSession, completion in
            loop.execute { bound.value.handOver(to: newSession, completion: completion) }
        }, moveAway: { completion in
            loop.execute { bound.value.moveAway(completion: completion) }
        })
        detachTimeout = loop.scheduleTask(in: .seconds(Int64(timeout))) { bound.value.endDetached() }
        // A server going down ends it at once, so what it holds reaches offline storage before storage closes.
        server.connections.insert(ObjectIdentifier(self)) { loop.execute { bound.value.endDetached() } }
        // The unacknowledged messages are parsed back only for a module that listens (push notifications).
        if server.router.modules[session.jid.domainpart]?.hooks[HookPoint<SessionDetachedEvent>.sessionDetached.name] != nil {
            let event = SessionDetachedEvent(jid: session.jid, unacknowledged: unacknowledgedMessages(to: session.jid))
            _ = server.router.run(.sessionDetached, event, on: session.jid.domainpart)
        }
        logger.debug("session detached, resumable", metadata: ["jid": "\(session.jid)"])
    }

    /// Gives this detached session to a resuming connection: the binding moves to `newSession`, the
    /// counting goes with it, and what still arrives here is passed on.
    private func handOver(to newSession: ClientSession, completion: @Sendable (StreamManagement?) -> Void) {
        guard detached, let session, server.registry.transfer(from: session, to: newSession) else { return completion(nil) }
        detached = false
        detachTimeout?.cancel()
        server.connections.remove(ObjectIdentifier(self))
        resumedBy = newSession
        let state = sm
        sm = StreamManagement()
        self.session = nil
        completion(state)
    }

    /// Another node of the cluster resumes this session: it leaves this node without its contacts or rooms
    /// noticing (no unavailable presence, no `sessionClosed`), and what still arrives here is routed to it.
    private func moveAway(completion: @Sendable (MovedSession?) -> Void) {
        guard detached, let session else { return completion(nil) }
        let jid = session.jid
        let entry = server.registry.resources(of: jid.bare).first { $0.jid == jid }
        detached = false
        detachTimeout?.cancel()
        server.connections.remove(ObjectIdentifier(self))
        let handover = SessionHandoverEvent(jid: jid)
        _ = server.router.run(.sessionHandingOver, handover, on: jid.domainpart)
        let moved = MovedSession(jid: jid, handled: sm.handled, sent: sm.sent, unacknowledged: sm.unacknowledged.compactMap { Self.element($0, to: jid) },
                                 presence: entry?.presence, flags: entry?.flags ?? [], carried: handover.carried)
        server.registry.unbind(session)
        movedAway = jid
        sm = StreamManagement()
        self.session = nil
        // Modules forget what they kept for the session here; the node taking it over learns it again.
        _ = server.router.run(.sessionMoved, SessionEvent(jid: jid), on: jid.domainpart)
        logger.debug("detached session handed to another node", metadata: ["jid": "\(jid)"])
        completion(moved)
    }

    /// No resumption came (or the session was replaced, or its queue overflowed): the session ends as if
    /// the connection had just closed, and messages the client never confirmed are kept for the account
    /// as undeliverable messages are (offline storage), per XEP-0198 §5.
    private func endDetached() {
        guard detached, let session else { return }
        detached = false
        detachTimeout?.cancel()
        server.connections.remove(ObjectIdentifier(self))
        if let id = sm.id { server.detached.remove(id) }
        server.registry.unbind(session)
        for stanza in unacknowledgedMessages(to: session.jid) {
            guard ["chat", "normal", nil].contains(stanza[attribute: "type"]), stanza.child("body") != nil else { continue }
            let from = stanza[attribute: "from"].flatMap { JID($0) }
            _ = server.router.run(.messageUndeliverable, StanzaEvent(stanza: stanza, origin: from, recipient: session.jid.bare), on: session.jid.domainpart)
        }
        sm = StreamManagement()
        _ = server.router.run(.sessionClosed, SessionEvent(jid: session.jid), on: session.jid.domainpart)
        logger.debug("detached session ended", metadata: ["jid": "\(session.jid)"])
        self.session = nil
    }

    /// The messages the client has not acknowledged, as elements again (a stored or shared stanza is parsed back).
    private func unacknowledgedMessages(to jid: JID) -> [XMLElement] {
        sm.unacknowledged.compactMap { Self.element($0, to: jid) }.filter { $0.name == "message" }
    }

    private static func element(_ outgoing: OutgoingStanza, to jid: JID) -> XMLElement? {
        switch outgoing {
        case .element(let element): return element
        case .addressed(let shared): return shared.element(to: jid)
        }
    }

    /// `<resume previd h/>` after authentication: takes the account's detached session over.
    private func resumeSession(user: JID, previd: String, h: UInt32) {
        guard let context, let settings = streamManagementSettings(for: user.domainpart) else { return perform(machine.resumeFailed()) }
        guard let entry = server.detached.take(previd, user: user) else {
            return resumeFromAnotherNode(user: user, previd: previd, h: h, maxQueue: settings.maxQueue, loop: context.eventLoop)
        }
        smQueueLimit = settings.maxQueue
        suspend()
        let loop = context.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        let newSession = ClientSession(
            jid: entry.jid, eventLoop: loop,
            deliver: { stanza in bound.value.deliver(stanza) },
            close: { condition in bound.value.closeSession(condition) },
            hold: { held in bound.value.holdReads(held) }
        )
        resumingDeliveries = []
        entry.handOver(newSession) { state in
            loop.execute { bound.value.finishResumption(newSession, previd: previd, h: h, state: state) }
        }
    }

    /// The id names another node of the cluster, or another node holds a resource of the account: that node
    /// hands the session over (XEP-0198 through a load balancer that sent the client elsewhere), and it is
    /// bound here with its counting. The node in the id is asked first; a session that moved on since is
    /// found where the account's resources are.
    private func resumeFromAnotherNode(user: JID, previd: String, h: UInt32, maxQueue: Int, loop: any EventLoop) {
        guard let cluster = server.router.cluster else { return perform(machine.resumeFailed()) }
        let here = server.configuration.cluster?.node
        var candidates: [String] = []
        for node in [ResumptionID.node(of: previd)].compactMap({ $0 }) + server.registry.resources(of: user.bare).compactMap({ state -> String? in
            if case .remote(let node) = state.location { return node }
            return nil
        }) where node != here && !candidates.contains(node) {
            candidates.append(node)
        }
        guard !candidates.isEmpty else { return perform(machine.resumeFailed()) }
        smQueueLimit = maxQueue
        suspend()
        askForSession(previd, user: user.bare, h: h, candidates: candidates, cluster: cluster, loop: loop)
    }

    private func askForSession(_ previd: String, user: JID, h: UInt32, candidates: [String], cluster: ClusterNode, loop: any EventLoop) {
        guard let node = candidates.first else { return finishRemoteResumption(nil, previd: previd, h: h, loop: loop) }
        let bound = NIOLoopBound(self, eventLoop: loop)
        let resumptions = server.remoteResumptions
        let request = resumptions.register { moved in
            loop.execute {
                if moved == nil && candidates.count > 1 {
                    bound.value.askForSession(previd, user: user, h: h, candidates: Array(candidates.dropFirst()), cluster: cluster, loop: loop)
                } else {
                    bound.value.finishRemoteResumption(moved, previd: previd, h: h, loop: loop)
                }
            }
        }
        guard cluster.send(.resumeRequest(id: previd, user: user, request: request), to: node) else {
            return resumptions.complete(request, nil)
        }
        // A node that does not answer (it died meanwhile) counts as one without the session.
        loop.scheduleTask(in: .seconds(10)) { resumptions.complete(request, nil) }
    }

    /// Binds the session another node handed over and resumes it on this connection. If the connection went
    /// away meanwhile, the session ends here as a detached one does (messages kept offline, contacts told).
    private func finishRemoteResumption(_ moved: MovedSession?, previd: String, h: UInt32, loop: any EventLoop) {
        guard let moved else {
            resume()
            return perform(machine.resumeFailed())
        }
        let bound = NIOLoopBound(self, eventLoop: loop)
        var created: ClientSession?
        let outcome = server.registry.bind(user: moved.jid.bare, resource: moved.jid.resourcepart, maxSessions: .max) { jid in
            let session = ClientSession(jid: jid, eventLoop: loop, deliver: { bound.value.deliver($0) },
                                        close: { bound.value.closeSession($0) }, hold: { bound.value.holdReads($0) })
            created = session
            return session
        }
        guard case .bound(_, let replaced) = outcome, let newSession = created else {
            resume()
            return perform(machine.resumeFailed())
        }
        if case .local(let old)? = replaced { old.close(.conflict) }
        for flag in moved.flags { server.registry.setFlag(flag, true, for: moved.jid) }
        // The presence goes through the modules as if the client had sent it again: routing learns the
        // resource is available, and modules what they keep per session (capabilities, say). What that
        // brings the session waits until it is resumed.
        resumingDeliveries = []
        if var presence = moved.presence {
            presence[attribute: "from"] = moved.jid.description
            presence[attribute: "to"] = nil
            server.router.route(presence, from: newSession)
        }
        _ = server.router.run(.sessionArrived, SessionArrivedEvent(jid: moved.jid, carried: moved.carried), on: moved.jid.domainpart)
        finishResumption(newSession, previd: previd, h: h, state: StreamManagement(resuming: moved, id: previd))
    }

    private func finishResumption(_ newSession: ClientSession, previd: String, h: UInt32, state: StreamManagement?) {
        defer { resume() }
        let held = resumingDeliveries ?? []
        resumingDeliveries = nil
        guard var state else { return perform(machine.resumeFailed()) }
        // An `h` beyond what was sent acknowledges nothing: everything unacknowledged is sent again.
        _ = state.acknowledge(h)
        // The old connection's request for an acknowledgement died with it.
        state.requestOutstanding = false
        session = newSession
        sm = state
        guard context != nil, !machine.isClosed else {
            // This connection went away during the hand-over: the session it took ends here instead.
            detached = true
            return endDetached()
        }
        authTimeout?.cancel()
        if countedUnauthenticated {
            countedUnauthenticated = false
            server.addressLimits.authenticated(remoteAddress)
        }
        if let loop = context?.eventLoop { startKeepalive(loop: loop) }
        perform(machine.resumed(newSession.jid))
        writeElement(XMLElement(name: "resumed", namespace: StreamManagement.namespace, attributes: ["h": String(sm.handled), "previd": previd]))
        for stanza in sm.unacknowledged { writeStanza(stanza) }
        // Modules hear of it once <resumed/> is written: what they deliver now (held presence) follows it.
        _ = server.router.run(.sessionResumed, SessionEvent(jid: newSession.jid), on: newSession.jid.domainpart)
        for stanza in held { deliver(stanza) }
        if !sm.unacknowledged.isEmpty, !sm.requestOutstanding {
            sm.requestOutstanding = true
            writeElement(XMLElement(name: "r", namespace: StreamManagement.namespace))
        }
        logger.debug("session resumed", metadata: ["jid": "\(newSession.jid)"])
        flushSoon()
    }

    private func storageFailed(_ error: any Error) {
        logger.error("storage failure during authentication", metadata: ["error": "\(error)"])
        perform(machine.authenticationUnavailable())
    }

    /// A stanza routed to this session from anywhere on the server.
    private func deliver(_ stanza: OutgoingStanza) {
        if let resumedBy { return resumedBy.deliver(stanza) }
        if let movedAway {
            if let element = Self.element(stanza, to: movedAway) { server.router.routeFromServer(element) }
            return
        }
        if resumingDeliveries != nil { return resumingDeliveries!.append(stanza) }
        if detached {
            // Kept for the resumption; a queue past its bound ends the wait now.
            if !sm.sending(stanza, limit: smQueueLimit) { endDetached() }
            return
        }
        guard session != nil, !machine.isClosed, context != nil else { return }
        if !sm.sending(stanza, limit: smQueueLimit) {
            return perform(machine.fail(.policyViolation, "too many stanzas left unacknowledged"))
        }
        writeStanza(stanza)
        ServerMetrics.delivered.count(stanza.name)
        if sm.enabled, !sm.requestOutstanding {
            sm.requestOutstanding = true
            writeElement(XMLElement(name: "r", namespace: StreamManagement.namespace))
        }
        flushSoon()
    }

    private func writeStanza(_ stanza: OutgoingStanza) {
        guard let context, let session else { return }
        switch stanza {
        case .element(let element):
            write(element.serialized(inheritedNamespace: inheritedNamespace))
        case .addressed(let shared):
            var buffer = context.channel.allocator.buffer(capacity: shared.approximateSize)
            shared.write(to: session.escapedAddress, declaringNamespace: machine.framing == .webSocket, into: &buffer)
            context.write(wrapOutboundOut(buffer), promise: nil)
            flushPending = true
            wroteSinceKeepalive = true
        }
    }

    private func closeSession(_ condition: StreamErrorCondition) {
        if let resumedBy { return resumedBy.close(condition) }
        if detached { return endDetached() }
        switch condition {
        case .conflict: perform(machine.replaced())
        default: perform(machine.fail(condition, nil))
        }
    }

    private func write(_ text: String) {
        guard let context else { return }
        var buffer = context.channel.allocator.buffer(capacity: text.utf8.count)
        buffer.writeString(text)
        context.write(wrapOutboundOut(buffer), promise: nil)
        flushPending = true
        wroteSinceKeepalive = true
    }

    /// Whitespace between stanzas when nothing else was written for a keepalive interval.
    private func keepaliveTick() {
        if wroteSinceKeepalive {
            wroteSinceKeepalive = false
        } else if session != nil, !machine.isClosed {
            write(" ")
            wroteSinceKeepalive = false
            flushSoon()
        }
    }

    /// Flushes now, or at the end of the current read burst so one burst costs one syscall.
    private func flushSoon() {
        guard flushPending, !inReadBurst, !flushScheduled, let context else { return }
        // Deliveries from other sessions on this loop arrive one by one: flush once they are all in.
        flushScheduled = true
        context.eventLoop.execute {
            self.flushScheduled = false
            guard self.flushPending, let context = self.context else { return }
            self.flushPending = false
            context.flush()
        }
    }

    private func suspend() { waiting = true }

    private func resume() {
        waiting = false
        while !waiting, !machine.isClosed, !queued.isEmpty { handle(queued.removeFirst()) }
        if !waiting, !machine.isClosed, let error = queuedParseError {
            queuedParseError = nil
            perform(machine.parseFailed(error))
        }
        flushSoon()
    }
}
