import Foundation
import Logging
import NIOCore
import StarlingAPI
import StarlingConfig
import StarlingS2S

/// Connects federation to the router: stanzas from other domains are routed like any other, those
/// that could not leave are bounced to their senders, and modules (Lua policy) may refuse a domain.
final class FederationBridge: FederationDelegate {
    private let router: Router

    init(router: Router) { self.router = router }

    func stanzaFromRemote(_ stanza: XMLElement) { router.routeFromRemote(stanza) }

    func undeliverable(_ stanza: XMLElement, _ failure: S2SFailure) { router.undeliverable(stanza, failure) }

    func allowsStream(with domain: String, incoming: Bool, address: String?) -> Bool {
        let event = RemoteStreamEvent(domain: domain, incoming: incoming, address: address)
        for host in router.hosts {
            switch router.run(.remoteStream, event, on: host) {
            case .reject, .refuse, .handled: return false
            case .pass, .modify: continue
            }
        }
        return true
    }

    /// Federation as `s2s:` describes it, presenting the server's own certificate.
    static func makeFederation(_ configuration: StarlingConfiguration, tls: TLSIdentity, router: Router,
                               group: any EventLoopGroup, logger: Logger) throws -> Federation? {
        guard let s2s = configuration.s2s else { return nil }
        let secret: [UInt8]
        if let file = s2s.dialbackSecretFile ?? configuration.cluster?.secretFile {
            guard let contents = FileManager.default.contents(atPath: file) else { throw S2SSetupError("cannot read the dialback secret \(file)") }
            secret = Array(String(decoding: contents, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines).utf8)
        } else {
            // A single node verifies only keys it gave out itself, while it runs.
            secret = (0..<32).map { _ in UInt8.random(in: 0...255) }
        }
        var stream = S2SStreamSettings(defaultDomain: configuration.hosts[0], requireTLS: s2s.requireTLS, dialback: s2s.dialback) { [weak router] domain in
            router?.isLocal(domain) ?? false
        }
        stream.bidi = s2s.bidi
        var settings = FederationSettings(stream: stream, keys: DialbackKeys(secret: secret))
        settings.routes = s2s.routes.mapValues { endpoints in
            endpoints.compactMap { StarlingConfiguration.hostAndPort($0).map { S2SEndpoint(host: $0.0, port: $0.1) } }
        }
        settings.nameServer = s2s.dnsServer.flatMap { StarlingConfiguration.hostAndPort($0) }.map { (host: $0.0, port: $0.1) }
        if let caFile = s2s.caFile { settings.trustRoots = try TrustRoots(pemFile: caFile) }
        settings.blockedDomains = Set(s2s.blockedDomains)
        settings.queueLimit = s2s.queueLimit
        settings.connectTimeout = s2s.connectTimeout
        settings.negotiationTimeout = s2s.negotiationTimeout
        settings.idleTimeout = s2s.idleTimeout
        settings.maxIncomingPerDomain = s2s.maxIncomingPerDomain
        settings.keepaliveInterval = configuration.limits.keepaliveInterval
        settings.maxStanzaBytes = configuration.limits.maxStanzaSize
        settings.maxDepth = configuration.limits.maxDepth
        var federationLogger = logger
        federationLogger[metadataKey: "component"] = "s2s"
        return try Federation(settings: settings, certificateChain: tls.certificateChain, privateKey: tls.privateKey, group: group, logger: federationLogger)
    }
}
