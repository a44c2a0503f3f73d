import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import StarlingAPI
import StarlingSASL
import StarlingXML

/// What the client sees arrive.
public enum ClientEvent: Sendable, Equatable {
    case streamOpen(XMLElement)
    case element(XMLElement)
    case streamClose
    /// The server sent something our parser refused.
    case parseError(String)
    /// The TCP connection is gone.
    case disconnected
}

public enum TestClientError: Error, CustomStringConvertible {
    case timeout(String)
    case unexpected(String)
    case authenticationFailed(String)

    public var description: String {
        switch self {
        case .timeout(let what): return "timed out waiting for \(what)"
        case .unexpected(let what): return "unexpected: \(what)"
        case .authenticationFailed(let condition): return "authentication failed: \(condition)"
        }
    }
}

/// A small XMPP client for tests and load generation: real TCP, real TLS, real SASL, no shortcuts.
public final class TestClient: @unchecked Sendable {
    public enum TLSMode: Sendable { case starttls, direct, none }

    public let channel: any Channel
    public let domain: String
    private let handler: ClientHandler
    private let events: EventQueue
    public private(set) var channelBinding: ChannelBinding?
    public private(set) var boundJID: JID?
    public private(set) var lastFeatures: XMLElement?

    private init(channel: any Channel, domain: String, handler: ClientHandler, events: EventQueue) {
        self.channel = channel
        self.domain = domain
        self.handler = handler
        self.events = events
    }

    /// Opens a TCP connection (with TLS from the first byte for `.direct`).
    /// - Parameter source: the local address to connect from (any 127.0.0.0/8 address on loopback).
    public static func connect(host: String = "127.0.0.1", port: Int, domain: String, tls: TLSMode, source: String? = nil,
                               group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> TestClient {
        let events = EventQueue()
        let handler = ClientHandler(events: events)
        var bootstrap = ClientBootstrap(group: group)
        if let source { bootstrap = bootstrap.bind(to: try SocketAddress(ipAddress: source, port: 0)) }
        let channel = try await bootstrap
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if tls == .direct {
                        try channel.pipeline.syncOperations.addHandler(try Self.makeTLSHandler(domain: domain))
                    }
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port).get()
        return TestClient(channel: channel, domain: domain, handler: handler, events: events)
    }

    private static func makeTLSHandler(domain: String) throws -> NIOSSLClientHandler {
        var configuration = TLSConfiguration.makeClientConfiguration()
        // Test servers use self-signed certificates.
        configuration.certificateVerification = .none
        configuration.applicationProtocols = ["xmpp-client"]
        return try NIOSSLClientHandler(context: NIOSSLContext(configuration: configuration), serverHostname: nil)
    }

    // MARK: Raw I/O

    public func send(_ text: String) {
        var buffer = channel.allocator.buffer(capacity: text.utf8.count)
        buffer.writeString(text)
        channel.writeAndFlush(buffer, promise: nil)
    }

    public func send(_ element: XMLElement) {
        send(element.serialized(inheritedNamespace: Namespace.client))
    }

    /// Events `waitFor` passed over, kept for later waits so nothing is lost between them.
    private var skipped: [ClientEvent] = []

    /// The elements earlier waits passed over and nobody has taken yet.
    public var passedOver: [XMLElement] {
        skipped.compactMap { event in
            if case .element(let element) = event { return element }
            return nil
        }
    }

    /// The next event (passed-over ones first), or `TestClientError.timeout`.
    public func next(timeout: Double = 10) async throws -> ClientEvent {
        if !skipped.isEmpty { return skipped.removeFirst() }
        return try await events.next(timeout: timeout, on: channel.eventLoop)
    }

    /// The next element, failing on anything else.
    public func nextElement(timeout: Double = 10) async throws -> XMLElement {
        let event = try await next(timeout: timeout)
        guard case .element(let element) = event else { throw TestClientError.unexpected("\(event) instead of an element") }
        return element
    }

    /// The first event (already passed over or new) that matches; the others stay for later calls.
    public func waitFor(timeout: Double = 10, _ description: String, where matches: (ClientEvent) -> Bool) async throws -> ClientEvent {
        if let index = skipped.firstIndex(where: matches) { return skipped.remove(at: index) }
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let remaining = deadline.timeIntervalSinceNow
            guard remaining > 0 else { throw TestClientError.timeout(description) }
            let event: ClientEvent
            do { event = try await events.next(timeout: remaining, on: channel.eventLoop) } catch TestClientError.timeout {
                throw TestClientError.timeout(description)
            }
            if matches(event) { return event }
            if event == .disconnected { throw TestClientError.unexpected("disconnected while waiting for \(description)") }
            if skipped.count < 10_000 { skipped.append(event) }
        }
    }

    /// The first element (already passed over or new) that matches; the others stay for later calls.
    public func expect(_ description: String, timeout: Double = 10, where matches: (XMLElement) -> Bool) async throws -> XMLElement {
        let event = try await waitFor(timeout: timeout, description) { event in
            if case .element(let element) = event { return matches(element) }
            return false
        }
        guard case .element(let element) = event else { throw TestClientError.unexpected("\(event)") }
        return element
    }

    /// Sends an IQ and waits for its result or error (matched by `id`).
    public func iq(_ xml: String, id: String, timeout: Double = 10) async throws -> XMLElement {
        send(xml)
        return try await expect("iq \(id)", timeout: timeout) {
            $0.name == "iq" && $0[attribute: "id"] == id && ($0[attribute: "type"] == "result" || $0[attribute: "type"] == "error")
        }
    }

    /// Waits for a stream error and returns its condition name (then expects the stream to close).
    public func expectStreamError(timeout: Double = 10) async throws -> String {
        let event = try await waitFor(timeout: timeout, "a stream error") { event in
            if case .element(let e) = event, e.name == "error", e.namespace == Namespace.stream { return true }
            return false
        }
        guard case .element(let error) = event, let condition = error.elements.first(where: { $0.namespace == Namespace.streamErrors && $0.name != "text" }) else {
            throw TestClientError.unexpected("\(event)")
        }
        return condition.name
    }

    // MARK: Negotiation

    /// Sends a stream header and returns the features.
    @discardableResult
    public func openStream() async throws -> XMLElement {
        send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='\(domain)' version='1.0'>")
        let header = try await next()
        guard case .streamOpen = header else { throw TestClientError.unexpected("\(header) instead of a stream header") }
        let features = try await nextElement()
        guard features.name == "features", features.namespace == Namespace.stream else {
            throw TestClientError.unexpected("\(features) instead of features")
        }
        lastFeatures = features
        return features
    }

    public var offeredMechanisms: [String] {
        lastFeatures?.child("mechanisms", namespace: Namespace.sasl)?.elements.map(\.text) ?? []
    }

    /// Negotiates STARTTLS on an open stream and opens the new stream.
    public func startTLS() async throws {
        send("<starttls xmlns='\(Namespace.tls)'/>")
        let proceed = try await nextElement()
        guard proceed.name == "proceed" else { throw TestClientError.unexpected("\(proceed)") }
        let domain = self.domain
        let handler = self.handler
        try await channel.eventLoop.submit {
            handler.resetParser()
            // Made on the channel's loop, where it is used (the handler is not Sendable).
            try self.channel.pipeline.syncOperations.addHandler(try Self.makeTLSHandler(domain: domain), position: .first)
        }.get()
        try await openStream()
    }

    /// tls-server-end-point (RFC 5929) of the server's certificate; SHA-256, which matches certificates
    /// signed with SHA-256 (ours and the common case).
    private func serverEndPointBinding() async throws -> ChannelBinding? {
        guard let certificate = try await channel.nioSSL_peerCertificate().get() else { return nil }
        return ChannelBinding(type: "tls-server-end-point", data: Array(SHA256.hash(data: try certificate.toDERBytes())))
    }

    /// Runs SASL with `mechanism`; on success restarts the stream. Throws `authenticationFailed(condition)`.
    public func authenticate(username: String, password: String, mechanism: String, authzid: String? = nil) async throws {
        if mechanism == "PLAIN" {
            let message = Array((authzid ?? "").utf8) + [0] + Array(username.utf8) + [0] + Array(password.utf8)
            send("<auth xmlns='\(Namespace.sasl)' mechanism='PLAIN'>\(Data(message).base64EncodedString())</auth>")
            try await finishSASL(verify: nil)
            return
        }
        let plus = mechanism.hasSuffix("-PLUS")
        // Read only now: the handshake is certainly over once the server has answered over TLS.
        if plus && channelBinding == nil { channelBinding = try await serverEndPointBinding() }
        let hash: SCRAMHash = mechanism.hasPrefix("SCRAM-SHA-256") ? .sha256 : .sha1
        var scram = SCRAMClient(hash: hash, username: username, password: password, authzid: authzid,
                                channelBinding: plus ? channelBinding : nil)
        send("<auth xmlns='\(Namespace.sasl)' mechanism='\(mechanism)'>\(Data(scram.clientFirst()).base64EncodedString())</auth>")
        let challenge = try await nextElement()
        guard challenge.name == "challenge" else { throw Self.failure(challenge) }
        let final = try scram.clientFinal(serverFirst: Array(Data(base64Encoded: challenge.text) ?? Data()))
        send("<response xmlns='\(Namespace.sasl)'>\(Data(final).base64EncodedString())</response>")
        try await finishSASL { data in try scram.verify(serverFinal: data) }
    }

    /// The SASL2 user-agent id the test client says it is unless told otherwise (FAST tokens are per id).
    public static let defaultUserAgentID = "d4565fa7-4d72-4749-b3d3-740edbf87770"

    /// XEP-0388 SASL2 on the open stream, with XEP-0386 Bind2 when `bindTag` is given: returns the
    /// `<success/>`, whose `<authorization-identifier/>` is the full JID when a resource was bound. The
    /// stream is not restarted.
    /// - Parameters:
    ///   - bindInline: what to enable inline in Bind2 (XEP-0386 §5), e.g. `<enable xmlns='urn:xmpp:sm:3'/>`.
    ///   - requestToken: a FAST mechanism to ask a token for (XEP-0484), read back with `fastToken(in:)`.
    @discardableResult
    public func authenticateSASL2(username: String, password: String, mechanism: String, bindTag: String? = nil, bindInline: String = "",
                                  userAgentID: String = TestClient.defaultUserAgentID, requestToken: String? = nil) async throws -> XMLElement {
        let sasl2 = "urn:xmpp:sasl:2"
        let extra = Self.sasl2Extras(userAgentID: userAgentID, bindTag: bindTag, bindInline: bindInline)
            + (requestToken.map { "<request-token xmlns='urn:xmpp:fast:0' mechanism='\($0)'/>" } ?? "")
        func authenticate(_ initial: [UInt8]) {
            send("<authenticate xmlns='\(sasl2)' mechanism='\(mechanism)'><initial-response>\(Data(initial).base64EncodedString())</initial-response>\(extra)</authenticate>")
        }
        var verify: (([UInt8]) throws -> Void)?
        if mechanism == "PLAIN" {
            authenticate([0] + Array(username.utf8) + [0] + Array(password.utf8))
        } else {
            let plus = mechanism.hasSuffix("-PLUS")
            if plus && channelBinding == nil { channelBinding = try await serverEndPointBinding() }
            var scram = SCRAMClient(hash: mechanism.hasPrefix("SCRAM-SHA-256") ? .sha256 : .sha1, username: username, password: password,
                                    authzid: nil, channelBinding: plus ? channelBinding : nil)
            authenticate(scram.clientFirst())
            let challenge = try await nextElement()
            guard challenge.name == "challenge", challenge.namespace == sasl2 else { throw Self.failure(challenge) }
            let final = try scram.clientFinal(serverFirst: Array(Data(base64Encoded: challenge.text) ?? Data()))
            send("<response xmlns='\(sasl2)'>\(Data(final).base64EncodedString())</response>")
            verify = { data in try scram.verify(serverFinal: data) }
        }
        return try await finishSASL2(verify: verify)
    }

    /// XEP-0484: logs in with a FAST token in one round trip, checking the server's proof that it knew the token.
    @discardableResult
    /// - Parameters:
    ///   - invalidate: `<fast invalidate='true'/>`, logging the token out.
    ///   - requestToken: a mechanism to ask a new token for at the same time.
    public func authenticateFAST(username: String, token: String, mechanism: String = "HT-SHA-256-NONE", bindTag: String? = nil,
                                 bindInline: String = "", userAgentID: String = TestClient.defaultUserAgentID, invalidate: Bool = false,
                                 requestToken: String? = nil) async throws -> XMLElement {
        guard let ht = HashedTokenMechanism(rawValue: mechanism) else { throw TestClientError.unexpected("not a FAST mechanism: \(mechanism)") }
        var binding: [UInt8] = []
        if ht.channelBindingType != nil {
            if channelBinding == nil { channelBinding = try await serverEndPointBinding() }
            binding = channelBinding?.data ?? []
        }
        let initial = HashedTokenMechanism.initialResponse(username: username, token: token, channelBinding: binding)
        let extra = Self.sasl2Extras(userAgentID: userAgentID, bindTag: bindTag, bindInline: bindInline)
            + "<fast xmlns='urn:xmpp:fast:0'\(invalidate ? " invalidate='true'" : "")/>"
            + (requestToken.map { "<request-token xmlns='urn:xmpp:fast:0' mechanism='\($0)'/>" } ?? "")
        send("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='\(mechanism)'><initial-response>\(Data(initial).base64EncodedString())</initial-response>\(extra)</authenticate>")
        return try await finishSASL2 { data in
            guard data == HashedTokenMechanism.responderProof(token: token, channelBinding: binding) else {
                throw TestClientError.unexpected("the server's FAST proof does not match the token")
            }
        }
    }

    /// The token and its expiry in a SASL2 `<success/>`, if the server issued one.
    public static func fastToken(in success: XMLElement) -> (token: String, expiry: String)? {
        guard let element = success.child("token", namespace: "urn:xmpp:fast:0"), let token = element[attribute: "token"],
              let expiry = element[attribute: "expiry"] else { return nil }
        return (token, expiry)
    }

    private static func sasl2Extras(userAgentID: String, bindTag: String?, bindInline: String) -> String {
        "<user-agent id='\(userAgentID)'><software>StarlingTestClient</software><device>loopback</device></user-agent>"
            + (bindTag.map { "<bind xmlns='urn:xmpp:bind:0'><tag>\($0)</tag>\(bindInline)</bind>" } ?? "")
    }

    private func finishSASL2(verify: (([UInt8]) throws -> Void)?) async throws -> XMLElement {
        let outcome = try await nextElement()
        guard outcome.name == "success", outcome.namespace == "urn:xmpp:sasl:2" else { throw Self.failure(outcome) }
        if let verify {
            try verify(Array(Data(base64Encoded: outcome.child("additional-data")?.text ?? "") ?? Data()))
        }
        if outcome.child("bound", namespace: "urn:xmpp:bind:0") != nil, let jid = outcome.child("authorization-identifier").flatMap({ JID($0.text) }) {
            boundJID = jid
        }
        return outcome
    }

    private func finishSASL(verify: (([UInt8]) throws -> Void)?) async throws {
        let outcome = try await nextElement()
        guard outcome.name == "success" else { throw Self.failure(outcome) }
        try verify?(Array(Data(base64Encoded: outcome.text) ?? Data()))
        let handler = self.handler
        try await channel.eventLoop.submit { handler.resetParser() }.get()
        try await openStream()
    }

    private static func failure(_ element: XMLElement) -> TestClientError {
        if element.name == "failure" { return .authenticationFailed(element.elements.first?.name ?? "?") }
        return .unexpected("\(element.serialized())")
    }

    /// Binds a resource (server-generated when nil) and returns the full JID.
    public func bind(resource: String?) async throws -> JID {
        var bind = XMLElement(name: "bind", namespace: Namespace.bind)
        if let resource { bind.append(XMLElement(name: "resource", namespace: Namespace.bind).with(text: resource)) }
        var iq = XMLElement(name: "iq", namespace: Namespace.client, attributes: ["type": "set", "id": "bind-1"])
        iq.append(bind)
        send(iq)
        let reply = try await nextElement()
        guard reply[attribute: "type"] == "result", let text = reply.child("bind")?.child("jid")?.text, let jid = JID(text) else {
            throw TestClientError.unexpected("bind reply \(reply.serialized())")
        }
        boundJID = jid
        return jid
    }

    /// STARTTLS (unless direct), SASL, bind, initial presence.
    public static func login(port: Int, domain: String, tls: TLSMode, username: String, password: String,
                             mechanism: String = "SCRAM-SHA-256", resource: String? = nil, presence: Bool = true, source: String? = nil,
                             host: String = "127.0.0.1") async throws -> TestClient {
        let client = try await connect(host: host, port: port, domain: domain, tls: tls, source: source)
        try await client.openStream()
        if tls == .starttls { try await client.startTLS() }
        try await client.authenticate(username: username, password: password, mechanism: mechanism)
        _ = try await client.bind(resource: resource)
        if presence { client.send("<presence/>") }
        return client
    }

    public func close() async {
        send("</stream:stream>")
        try? await channel.close()
    }

    /// Drops the connection without closing the stream, as a phone losing its network does.
    public func drop() async {
        try? await channel.close()
    }
}

/// Parses what the server sends and queues it for the test.
final class ClientHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer

    private let events: EventQueue
    private let parser = XMLStreamParser(limits: XMLStreamLimits(maxStanzaBytes: 16 * 1024 * 1024, maxDepth: 64))
    private var scratch: [XMLStreamEvent] = []
    private var failed = false

    init(events: EventQueue) { self.events = events }

    func resetParser() {
        parser.reset()
        failed = false
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        guard !failed else { return }
        scratch.removeAll(keepingCapacity: true)
        var failure: XMLStreamError?
        buffer.withUnsafeReadableBytes { bytes in
            do throws(XMLStreamError) { try parser.feed(bytes, into: &scratch) } catch { failure = error }
        }
        for event in scratch {
            switch event {
            case .streamOpen(let header, _): events.push(.streamOpen(header))
            case .stanza(let element): events.push(.element(element))
            case .streamClose: events.push(.streamClose)
            }
        }
        if let failure {
            failed = true
            events.push(.parseError("\(failure)"))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        events.push(.disconnected)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// A single-consumer queue of events with a timed wait.
final class EventQueue: Sendable {
    private struct State {
        var buffer: [ClientEvent] = []
        var waiter: CheckedContinuation<ClientEvent, any Error>?
        var waiterID = 0
    }

    private let state = NIOLockedValueBox(State())

    func push(_ event: ClientEvent) {
        let waiter = state.withLockedValue { state -> CheckedContinuation<ClientEvent, any Error>? in
            if let waiter = state.waiter {
                state.waiter = nil
                return waiter
            }
            state.buffer.append(event)
            return nil
        }
        waiter?.resume(returning: event)
    }

    func next(timeout: Double, on loop: any EventLoop) async throws -> ClientEvent {
        try await withCheckedThrowingContinuation { continuation in
            let id = state.withLockedValue { state -> Int? in
                if !state.buffer.isEmpty {
                    continuation.resume(returning: state.buffer.removeFirst())
                    return nil
                }
                state.waiterID += 1
                state.waiter = continuation
                return state.waiterID
            }
            guard let id else { return }
            loop.scheduleTask(in: .milliseconds(Int64(timeout * 1000))) {
                let expired = self.state.withLockedValue { state -> CheckedContinuation<ClientEvent, any Error>? in
                    guard state.waiterID == id, let waiter = state.waiter else { return nil }
                    state.waiter = nil
                    return waiter
                }
                expired?.resume(throwing: TestClientError.timeout("an event"))
            }
        }
    }
}
