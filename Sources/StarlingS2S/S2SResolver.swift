private import CResolv
import NIOPosix

/// Where to reach a remote domain (RFC 6120 §3.2.1, XEP-0368): a configured route; otherwise the SRV
/// records of `_xmpps-server._tcp` (direct TLS) and `_xmpp-server._tcp` (STARTTLS) in priority order,
/// direct TLS first among equals; without any, the domain itself on port 5269.
struct S2SResolver: Sendable {
    let routes: [String: [S2SEndpoint]]
    /// A name server to ask instead of the system's (`s2s.dns_server`), which then also resolves the
    /// SRV targets' addresses.
    let nameServer: (host: String, port: Int)?

    enum Answer: Equatable {
        case records([SRVRecord])
        case noSuchName
        case failed
    }

    struct SRVRecord: Equatable {
        let priority: Int
        let weight: Int
        let port: Int
        let target: String
    }

    func endpoints(for domain: String) async throws -> [S2SEndpoint] {
        if let configured = routes[domain] { return configured }
        let nameServer = self.nameServer
        let (direct, starttls) = try await NIOThreadPool.singleton.runIfActive {
            (Self.srv("_xmpps-server._tcp.\(domain)", nameServer), Self.srv("_xmpp-server._tcp.\(domain)", nameServer))
        }
        let endpoints = try Self.order(direct: direct, starttls: starttls, domain: domain)
        if let nameServer {
            // The system's resolver does not know this name server: addresses come from it too.
            return try await NIOThreadPool.singleton.runIfActive {
                endpoints.flatMap { endpoint in
                    Self.addresses(endpoint.host, nameServer).map { S2SEndpoint(host: $0, port: endpoint.port, directTLS: endpoint.directTLS) }
                }
            }
        }
        return endpoints
    }

    /// The endpoints the two SRV answers give, or the domain on 5269 when neither has records.
    static func order(direct: Answer, starttls: Answer, domain: String) throws -> [S2SEndpoint] {
        var candidates: [(record: SRVRecord, directTLS: Bool)] = []
        if case .records(let records) = direct { candidates += records.map { ($0, true) } }
        if case .records(let records) = starttls { candidates += records.map { ($0, false) } }
        guard !candidates.isEmpty else { return [S2SEndpoint(host: domain, port: 5269)] }
        // RFC 2782: a lone "." target says the service is decidedly not available.
        let usable = candidates.filter { !$0.record.target.isEmpty && $0.record.target != "." }
        guard !usable.isEmpty else { throw S2SFailure(.remoteServerNotFound, "\(domain) announces no server-to-server service") }
        return usable.sorted { a, b in
            if a.record.priority != b.record.priority { return a.record.priority < b.record.priority }
            if a.directTLS != b.directTLS { return a.directTLS }
            return a.record.weight > b.record.weight
        }.map { S2SEndpoint(host: $0.record.target, port: $0.record.port, directTLS: $0.directTLS) }
    }

    private static func srv(_ name: String, _ server: (host: String, port: Int)?) -> Answer {
        var records = [starling_srv_record](repeating: starling_srv_record(), count: 16)
        let count = records.withUnsafeMutableBufferPointer { buffer in
            starling_dns_srv(name, server?.host, Int32(server?.port ?? 53), buffer.baseAddress, Int32(buffer.count))
        }
        switch count {
        case STARLING_DNS_NO_SUCH_NAME: return .noSuchName
        case ..<0: return .failed
        default:
            return .records(records.prefix(Int(count)).map { record in
                var target = record.target
                let name = withUnsafeBytes(of: &target) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                return SRVRecord(priority: Int(record.priority), weight: Int(record.weight), port: Int(record.port), target: name)
            })
        }
    }

    private static func addresses(_ host: String, _ server: (host: String, port: Int)) -> [String] {
        var addresses = [starling_address](repeating: starling_address(), count: 8)
        let count = addresses.withUnsafeMutableBufferPointer { buffer in
            starling_dns_addresses(host, server.host, Int32(server.port), buffer.baseAddress, Int32(buffer.count))
        }
        guard count > 0 else { return [] }
        return addresses.prefix(Int(count)).map { address in
            var text = address.text
            return withUnsafeBytes(of: &text) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        }
    }
}
