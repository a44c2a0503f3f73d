/// Where to reach a remote domain: the configured route if there is one, otherwise the domain itself on
/// the standard port (RFC 6120 §3.2.2's fallback).
struct S2SResolver: Sendable {
    let routes: [String: [S2SEndpoint]]

    func endpoints(for domain: String) async throws -> [S2SEndpoint] {
        if let configured = routes[domain] { return configured }
        return [S2SEndpoint(host: domain, port: 5269)]
    }
}
