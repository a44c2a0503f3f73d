import ArgumentParser
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import StarlingSASL

/// How a load connection secures its stream.
enum LoadTLS: String, ExpressibleByArgument, Sendable {
    case none, starttls, direct
}

/// Who a load connection logs in as, and how.
struct LoginSpec: Sendable {
    var domain: String
    var username: String
    var password: String
    var mechanism: String
    var tls: LoadTLS
    var transport = LoadTransport.tcp
    /// The WebSocket endpoint's path, for `transport == .websocket`.
    var webSocketPath = "/xmpp-websocket"
    var resource = "load"
    /// Create the account with in-band registration (XEP-0077) before logging in; "already exists"
    /// counts as success. For loading servers whose accounts the tool cannot create directly.
    var register = false
    /// Log in with SASL2 and Bind2 (XEP-0388, XEP-0386): one exchange instead of SASL, restart and bind.
    var sasl2 = false
    /// With `sasl2`: ask for a FAST token for this mechanism (XEP-0484); it lands in `issuedToken`.
    var requestToken: String?
    /// With `sasl2`: log in with this FAST token (HT-SHA-256-NONE) instead of the password.
    var fastToken: String?
}

/// One generator connection: logs in (optional STARTTLS, PLAIN or SCRAM, bind, initial presence), then
/// counts the messages it receives and stamps the ones it sends.
///
/// The generator must stay far cheaper than the server it measures, so it never builds an XML tree: it
/// scans the bytes for the handful of markers each step needs. It is not a general XMPP client (the
/// test client is); it only has to understand well-formed replies from a working server. Everything
/// runs on the connection's event loop.
final class LoadConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase { case features, proceed, register, sasl, bind, ready, closed }

    let spec: LoginSpec
    let loop: any EventLoop
    private let loggedIn: EventLoopPromise<Void>
    private(set) var phase = Phase.features
    private var channel: (any Channel)?
    private var tlsDone: Bool
    private var authenticated = false
    private var registered = false
    private var scram: SCRAMClient?
    /// The FAST token the server issued at login (`LoginSpec.requestToken`).
    private(set) var issuedToken: String?
    private var inbox: [UInt8] = []
    private var loginDeadline: Scheduled<Void>?
    static let loginTimeoutSeconds: Int64 = 60

    /// Chat traffic state, owned by the scenario driver on this loop.
    var partnerAddress = ""
    weak var partner: LoadConnection?
    /// Fraction of a send interval this session lags the others by, so fixed-rate senders do not all fire
    /// in the same millisecond.
    var sendPhase = 0.0
    var sent = 0
    var received = 0
    var receivedErrors = 0
    /// Called for every received message with the send time stamped in its body, and the sender's
    /// number when the body carries one (groupchat: "STAMP:SENDER"), else -1.
    var onMessage: ((UInt64, Int) -> Void)?
    /// MUC traffic state: the room, this session's number, and how many of its own messages the room
    /// has reflected back to it.
    var roomAddress = ""
    var number = 0
    var echoed = 0
    /// A join waiting for its self-presence (status 110); succeeds with whether the room was created (201).
    private var pendingJoin: EventLoopPromise<Bool>?
    /// An IQ waiting for its answer, by id.
    private var pendingIQ: (marker: [UInt8], promise: EventLoopPromise<Void>)?
    /// Called at the end of each read burst in the ready phase.
    var onReadComplete: (() -> Void)?
    var onClose: (() -> Void)?

    private init(spec: LoginSpec, loop: any EventLoop) {
        self.spec = spec
        self.loop = loop
        self.loggedIn = loop.makePromise()
        self.tlsDone = spec.tls == .direct
    }

    /// Connects and logs in; the future completes once initial presence is sent.
    static func login(_ spec: LoginSpec, host: String, port: Int, sourceAddress: String?, on loop: any EventLoop) -> EventLoopFuture<LoadConnection> {
        let connection = LoadConnection(spec: spec, loop: loop)
        var bootstrap = ClientBootstrap(group: loop)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(30))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if spec.tls == .direct {
                        try channel.pipeline.syncOperations.addHandler(try LoadConnection.tlsHandler(webSocket: spec.transport == .websocket))
                    }
                    switch spec.transport {
                    case .tcp: try channel.pipeline.syncOperations.addHandler(connection)
                    case .websocket: try configureWebSocket(channel, host: host, path: spec.webSocketPath, connection: connection)
                    }
                }
            }
        if let sourceAddress {
            do { bootstrap = bootstrap.bind(to: try SocketAddress(ipAddress: sourceAddress, port: 0)) } catch {
                return loop.makeFailedFuture(error)
            }
        }
        return bootstrap.connect(host: host, port: port).flatMap { _ in
            connection.loggedIn.futureResult.map { connection }
        }
    }

    private static func makeTLSContext(protocols: [String]) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        // Load targets use self-signed certificates.
        configuration.certificateVerification = .none
        configuration.applicationProtocols = protocols
        return try! NIOSSLContext(configuration: configuration)
    }
    private static let tlsContext = makeTLSContext(protocols: ["xmpp-client"])
    private static let httpsContext = makeTLSContext(protocols: ["http/1.1"])

    private static func tlsHandler(webSocket: Bool = false) throws -> NIOSSLClientHandler {
        try NIOSSLClientHandler(context: webSocket ? httpsContext : tlsContext, serverHostname: nil)
    }

    // MARK: Output

    func write(_ text: String) {
        guard let channel else { return }
        var buffer = channel.allocator.buffer(capacity: text.utf8.count + 24)
        // RFC 7395: every WebSocket message is a document of its own, so a stanza names jabber:client itself
        // (Prosody insists; the stream header carries it over TCP).
        if spec.transport == .websocket, let name = Self.stanzaNames.first(where: { text.hasPrefix($0) }) {
            buffer.writeString(name)
            buffer.writeString(" xmlns='jabber:client'")
            buffer.writeSubstring(text.dropFirst(name.count))
        } else {
            buffer.writeString(text)
        }
        channel.write(buffer, promise: nil)
    }

    private static let stanzaNames = ["<message", "<presence", "<iq"]

    func flush() { channel?.flush() }

    /// Sends one chat message to the partner with the current time in its body.
    func sendChat() {
        sent += 1
        write("<message to='\(partnerAddress)' type='chat' id='m\(sent)'><body>\(DispatchTime.now().uptimeNanoseconds)</body></message>")
    }

    /// Sends one groupchat message to the room with the current time and this session's number in its body.
    func sendGroupchat() {
        sent += 1
        write("<message to='\(roomAddress)' type='groupchat' id='g\(sent)'><body>\(DispatchTime.now().uptimeNanoseconds):\(number)</body></message>")
    }

    /// Enters `roomAddress` as `nick` (asking for no history); completes with whether the room was created.
    func join(nick: String) -> EventLoopFuture<Bool> {
        let promise = loop.makePromise(of: Bool.self)
        pendingJoin = promise
        write("<presence to='\(roomAddress)/\(nick)'><x xmlns='http://jabber.org/protocol/muc'><history maxchars='0'/></x></presence>")
        flush()
        return promise.futureResult
    }

    /// Sends an IQ and completes when its answer (of any type) arrives.
    func iq(id: String, _ text: String) -> EventLoopFuture<Void> {
        request(text, until: "id='\(id)'")
    }

    /// Sends `text` and completes once the server's answer contains `marker`.
    func request(_ text: String, until marker: String) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: Void.self)
        pendingIQ = (Array(marker.utf8), promise)
        write(text)
        flush()
        return promise.futureResult
    }

    func close() {
        phase = .closed
        channel?.close(promise: nil)
    }

    // MARK: Input

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
        self.context = context
    }

    private var context: ChannelHandlerContext?

    /// Over WebSocket this handler joins during the upgrade, on a connection that is already up: it
    /// starts once the HTTP handlers have left the pipeline.
    func webSocketUpgraded() {
        guard let context, context.channel.isActive else { return fail("the WebSocket closed during the upgrade") }
        start(context: context)
    }

    func channelActive(context: ChannelHandlerContext) {
        start(context: context)
        context.fireChannelActive()
    }

    private func start(context: ChannelHandlerContext) {
        // A server that stops answering must fail the run, not hang it; the phase says where it stopped.
        loginDeadline = context.eventLoop.scheduleTask(in: .seconds(Self.loginTimeoutSeconds)) { [self] in
            fail("no answer within \(Self.loginTimeoutSeconds) s while in phase \(phase)")
            channel?.close(promise: nil)
        }
        openStream()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if phase != .ready && phase != .closed { fail("connection closed during login") }
        phase = .closed
        onClose?()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail("\(error)")
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        inbox.append(contentsOf: buffer.readableBytesView)
        if phase == .ready {
            if pendingJoin != nil || pendingIQ != nil { scanRoomReplies() }
            scanMessages()
        } else {
            advanceLogin(context: context)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if phase == .ready { onReadComplete?() }
        context.flush()
    }

    private func fail(_ reason: String) {
        loginDeadline?.cancel()
        if phase != .ready && phase != .closed { loggedIn.fail(LoadError(reason: "\(spec.username): \(reason)")) }
        phase = .closed
    }

    private func openStream() {
        switch spec.transport {
        case .tcp:
            write("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='\(spec.domain)' version='1.0'>")
        case .websocket:
            write("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='\(spec.domain)' version='1.0'/>")
        }
        flush()
    }

    private func advanceLogin(context: ChannelHandlerContext) {
        switch phase {
        case .features:
            guard inbox.find(Marker.featuresEnd) != nil || inbox.find(Marker.featuresEmpty) != nil else { return }
            inbox.removeAll()
            if !tlsDone && spec.tls == .starttls {
                write("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                phase = .proceed
            } else if !authenticated && spec.register && !registered {
                write("<iq type='set' id='reg1'><query xmlns='jabber:iq:register'><username>\(spec.username)</username><password>\(spec.password)</password></query></iq>")
                phase = .register
            } else if !authenticated {
                startSASL()
            } else {
                write("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>\(spec.resource)</resource></bind></iq>")
                phase = .bind
            }
            flush()
        case .proceed:
            if inbox.find(Marker.proceed) != nil {
                inbox.removeAll()
                tlsDone = true
                phase = .features
                do { try context.pipeline.syncOperations.addHandler(try Self.tlsHandler(), position: .first) } catch {
                    fail("TLS: \(error)")
                    return
                }
                openStream()
            } else if inbox.find(Marker.failure) != nil {
                fail("STARTTLS refused")
            }
        case .register:
            guard let end = inbox.find(Marker.iqEnd) ?? inbox.find(Marker.iqSelfClosedResult) else { return }
            let reply = inbox[..<(end + 2)]
            let ok = reply.containsMarker(Marker.resultSingle) || reply.containsMarker(Marker.resultDouble) || reply.containsMarker(Marker.conflict)
            inbox.removeAll()
            guard ok else { return fail("in-band registration refused") }
            registered = true
            startSASL()
            flush()
        case .sasl:
            if let start = inbox.find(Marker.challenge) {
                guard let payload = inbox.elementText(startingAt: start, closing: Marker.challengeEnd) else { return }
                inbox.removeAll()
                guard var client = scram, let serverFirst = Data(base64Encoded: payload),
                      let final = try? client.clientFinal(serverFirst: Array(serverFirst))
                else { return fail("unexpected SASL challenge") }
                scram = client
                write("<response xmlns='\(spec.sasl2 ? "urn:xmpp:sasl:2" : "urn:ietf:params:xml:ns:xmpp-sasl")'>\(Data(final).base64EncodedString())</response>")
                flush()
            } else if let start = inbox.find(Marker.success) {
                guard inbox.elementText(startingAt: start, closing: Marker.successEnd) != nil else { return }
                if spec.sasl2 {
                    // Bound already (Bind2): the success may carry a FAST token.
                    if let attribute = inbox.find(Marker.tokenAttribute, from: start) {
                        let value = inbox[(attribute + Marker.tokenAttribute.count)...].prefix { $0 != UInt8(ascii: "'") }
                        issuedToken = String(decoding: value, as: UTF8.self)
                    }
                    inbox.removeAll()
                    return loggedInAndBound()
                }
                inbox.removeAll()
                authenticated = true
                phase = .features
                openStream()
            } else if inbox.find(Marker.failure) != nil {
                fail("authentication failed")
            }
        case .bind:
            guard let end = inbox.find(Marker.iqEnd) else { return }
            let ok = inbox[..<end].containsMarker(Marker.resultSingle) || inbox[..<end].containsMarker(Marker.resultDouble)
            inbox.removeAll()
            guard ok else { return fail("bind refused") }
            loggedInAndBound()
        case .ready, .closed:
            break
        }
    }

    private func loggedInAndBound() {
        write("<presence/>")
        flush()
        phase = .ready
        loginDeadline?.cancel()
        loggedIn.succeed(())
    }

    private func startSASL() {
        phase = .sasl
        if spec.sasl2 { return startSASL2() }
        if spec.mechanism == "PLAIN" {
            let message = Array("\0\(spec.username)\0\(spec.password)".utf8)
            write("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>\(Data(message).base64EncodedString())</auth>")
            return
        }
        let hash: SCRAMHash = spec.mechanism == "SCRAM-SHA-1" ? .sha1 : .sha256
        let client = SCRAMClient(hash: hash, username: spec.username, password: spec.password, derive: SaltedPasswords.shared.derive(hash))
        scram = client
        write("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='\(spec.mechanism)'>\(Data(client.clientFirst()).base64EncodedString())</auth>")
    }

    /// XEP-0388 with Bind2 inline, and a FAST token asked for or logged in with (XEP-0484).
    private func startSASL2() {
        var extra = "<user-agent id='bench-\(spec.username)'/><bind xmlns='urn:xmpp:bind:0'><tag>\(spec.resource)</tag></bind>"
        if let requested = spec.requestToken { extra += "<request-token xmlns='urn:xmpp:fast:0' mechanism='\(requested)'/>" }
        let mechanism: String, initial: [UInt8]
        if let token = spec.fastToken {
            mechanism = HashedTokenMechanism.sha256None.rawValue
            initial = HashedTokenMechanism.initialResponse(username: spec.username, token: token, channelBinding: [])
            extra += "<fast xmlns='urn:xmpp:fast:0'/>"
        } else if spec.mechanism == "PLAIN" {
            mechanism = "PLAIN"
            initial = Array("\0\(spec.username)\0\(spec.password)".utf8)
        } else {
            let hash: SCRAMHash = spec.mechanism == "SCRAM-SHA-1" ? .sha1 : .sha256
            let client = SCRAMClient(hash: hash, username: spec.username, password: spec.password, derive: SaltedPasswords.shared.derive(hash))
            scram = client
            mechanism = spec.mechanism
            initial = client.clientFirst()
        }
        write("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='\(mechanism)'><initial-response>\(Data(initial).base64EncodedString())</initial-response>\(extra)</authenticate>")
    }

    /// A join's self-presence (or its refusal) and an awaited IQ's answer.
    private func scanRoomReplies() {
        if let promise = pendingJoin {
            if let own = inbox.find(Marker.selfPresenceSingle) ?? inbox.find(Marker.selfPresenceDouble) {
                pendingJoin = nil
                let created = inbox[..<own].containsMarker(Marker.createdSingle) || inbox[..<own].containsMarker(Marker.createdDouble)
                    || inbox.find(Marker.createdSingle, from: own) != nil || inbox.find(Marker.createdDouble, from: own) != nil
                promise.succeed(created)
            } else if let error = inbox.find(Marker.errorElement) {
                pendingJoin = nil
                let end = Swift.min(inbox.count, error + 200)
                promise.fail(LoadError(reason: "\(spec.username) could not join \(roomAddress): \(String(decoding: inbox[error..<end], as: UTF8.self))"))
            }
        }
        if let (marker, promise) = pendingIQ, inbox.find(marker) != nil {
            pendingIQ = nil
            promise.succeed(())
        }
    }

    /// Counts complete `<message>` stanzas and drops everything else; a partial one stays for the next read.
    private func scanMessages() {
        var cursor = 0
        while true {
            guard let start = inbox.find(Marker.messageStart, from: cursor) else {
                // Keep a tail in case a `<message` start is split across reads.
                cursor = max(cursor, inbox.count - Marker.messageStart.count)
                break
            }
            guard let end = inbox.find(Marker.messageEnd, from: start) else {
                cursor = start
                break
            }
            let stanza = inbox[start..<end]
            if stanza.containsMarker(Marker.errorSingle) || stanza.containsMarker(Marker.errorDouble) {
                receivedErrors += 1
            } else if let body = inbox.find(Marker.bodyStart, from: start), body < end {
                var stamp: UInt64 = 0
                var index = body + Marker.bodyStart.count
                while index < end, inbox[index] >= 48, inbox[index] <= 57 {
                    stamp = stamp * 10 + UInt64(inbox[index] - 48)
                    index += 1
                }
                var sender = -1
                if index < end, inbox[index] == UInt8(ascii: ":") {
                    sender = 0
                    index += 1
                    while index < end, inbox[index] >= 48, inbox[index] <= 57 {
                        sender = sender * 10 + Int(inbox[index] - 48)
                        index += 1
                    }
                }
                received += 1
                if sender == number { echoed += 1 }
                onMessage?(stamp, sender)
            }
            cursor = end + Marker.messageEnd.count
        }
        if cursor > 0 { inbox.removeFirst(min(cursor, inbox.count)) }
    }
}

/// SaltedPassword per (hash, password, salt, iterations), computed once (RFC 5802 §5.1 lets clients
/// cache it). Without it the generator spends more CPU on PBKDF2 than the server spends on the login,
/// and a SCRAM run measures the generator.
final class SaltedPasswords: @unchecked Sendable {
    static let shared = SaltedPasswords()
    private let lock = NIOLock()
    private var cache: [String: [UInt8]] = [:]

    func derive(_ hash: SCRAMHash) -> @Sendable (String, [UInt8], Int) -> [UInt8] {
        { [self] password, salt, iterations in
            let key = "\(hash.rawValue)|\(password)|\(salt)|\(iterations)"
            if let known = lock.withLock({ cache[key] }) { return known }
            let derived = hash.saltedPassword(password, salt: salt, iterations: iterations)
            lock.withLock { cache[key] = derived }
            return derived
        }
    }
}

struct LoadError: Error, CustomStringConvertible {
    var reason: String
    var description: String { reason }
}

private enum Marker {
    static let featuresEnd = Array("</stream:features>".utf8)
    static let featuresEmpty = Array("<stream:features/>".utf8)
    static let proceed = Array("<proceed".utf8)
    static let failure = Array("<failure".utf8)
    static let challenge = Array("<challenge".utf8)
    static let challengeEnd = Array("</challenge>".utf8)
    static let success = Array("<success".utf8)
    static let successEnd = Array("</success>".utf8)
    static let iqEnd = Array("</iq>".utf8)
    static let iqSelfClosedResult = Array("/>".utf8)
    static let conflict = Array("<conflict".utf8)
    static let resultSingle = Array("type='result'".utf8)
    static let resultDouble = Array("type=\"result\"".utf8)
    static let messageStart = Array("<message".utf8)
    static let messageEnd = Array("</message>".utf8)
    static let errorSingle = Array("type='error'".utf8)
    static let errorDouble = Array("type=\"error\"".utf8)
    static let bodyStart = Array("<body>".utf8)
    static let selfPresenceSingle = Array("code='110'".utf8)
    static let selfPresenceDouble = Array("code=\"110\"".utf8)
    static let createdSingle = Array("code='201'".utf8)
    static let createdDouble = Array("code=\"201\"".utf8)
    static let errorElement = Array("<error".utf8)
    static let tokenAttribute = Array(" token='".utf8)
}

extension Array where Element == UInt8 {
    /// The offset of `needle` at or after `from`.
    func find(_ needle: [UInt8], from: Int = 0) -> Int? {
        guard from < count else { return nil }
        return withUnsafeBytes { haystack in
            search(needle, in: UnsafeRawBufferPointer(rebasing: haystack[from...])).map { $0 + from }
        }
    }

    /// The text between the `>` that ends the start tag at `start` and `closing`; "" for an empty element,
    /// nil while it is incomplete.
    func elementText(startingAt start: Int, closing: [UInt8]) -> String? {
        guard let open = self[start...].firstIndex(of: UInt8(ascii: ">")) else { return nil }
        if self[open - 1] == UInt8(ascii: "/") { return "" }
        guard let end = find(closing, from: open) else { return nil }
        return String(decoding: self[(open + 1)..<end], as: UTF8.self)
    }
}

extension ArraySlice where Element == UInt8 {
    func containsMarker(_ needle: [UInt8]) -> Bool {
        withUnsafeBytes { search(needle, in: $0) != nil }
    }
}

/// memchr for the first byte, memcmp for the rest (Glibc does not export memmem to Swift).
private func search(_ needle: [UInt8], in haystack: UnsafeRawBufferPointer) -> Int? {
    guard let base = haystack.baseAddress, !needle.isEmpty, haystack.count >= needle.count else { return nil }
    return needle.withUnsafeBytes { pattern in
        var offset = 0
        let last = haystack.count - needle.count
        while offset <= last {
            guard let hit = memchr(base + offset, Int32(needle[0]), last - offset + 1) else { return nil }
            let position = base.distance(to: UnsafeRawPointer(hit))
            if memcmp(base + position, pattern.baseAddress!, needle.count) == 0 { return position }
            offset = position + 1
        }
        return nil
    }
}
