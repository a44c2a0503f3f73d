import Crypto
import Foundation
import StarlingAPI

/// XEP-0215: tells clients where the STUN and TURN servers for audio and video calls are, with
/// short-lived TURN credentials derived from a secret shared with the TURN server (the "TURN REST API"
/// scheme coturn's `use-auth-secret` implements), so no long-term TURN password is handed out.
public final class ExternalServicesModule: ServerModule {
    public static let namespace = "urn:xmpp:extdisco:2"
    public static let descriptor = ModuleDescriptor(
        name: "extdisco", summary: "STUN and TURN servers for calls, with short-lived TURN credentials.", xeps: ["XEP-0215"],
        options: [
            ModuleOptionSpec("stun_host", .string(choices: nil), default: .string(""), doc: "The STUN server's host name (empty: none)."),
            ModuleOptionSpec("stun_port", .integer(1...65_535), default: .integer(3478), doc: "The STUN server's port."),
            ModuleOptionSpec("turn_host", .string(choices: nil), default: .string(""), doc: "The TURN server's host name (empty: none)."),
            ModuleOptionSpec("turn_port", .integer(1...65_535), default: .integer(3478), doc: "The TURN server's port."),
            ModuleOptionSpec("turn_transport", .string(choices: ["udp", "tcp"]), default: .string("udp"), doc: "The TURN server's transport."),
            ModuleOptionSpec("turn_secret_file", .string(choices: nil), default: .string(""),
                             doc: "A file holding the secret shared with the TURN server (coturn's static-auth-secret), relative to the config file."),
            ModuleOptionSpec("turn_ttl", .integer(60...2_592_000), default: .integer(86_400), doc: "Seconds TURN credentials stay valid."),
        ]
    )

    private struct Service: Sendable {
        let type: String
        let host: String
        let port: Int
        let transport: String
        let authenticated: Bool
    }

    private let services: [Service]
    private let secret: Data?
    private let ttl: Int

    public init(host: any ModuleHost) throws {
        let options = host.options
        var services: [Service] = []
        if !options.string("stun_host").isEmpty {
            services.append(Service(type: "stun", host: options.string("stun_host"), port: options.integer("stun_port"), transport: "udp", authenticated: false))
        }
        var secret: Data?
        if !options.string("turn_host").isEmpty {
            let path = options.string("turn_secret_file")
            if !path.isEmpty {
                let base = host.service(ServerPaths.self)?.configDirectory ?? FileManager.default.currentDirectoryPath
                let resolved = path.hasPrefix("/") ? path : URL(fileURLWithPath: base).appendingPathComponent(path).path
                guard let text = try? String(contentsOfFile: resolved, encoding: .utf8),
                      case let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines), !trimmed.isEmpty else {
                    throw ModuleStartError("extdisco: cannot read a TURN secret from \(resolved)")
                }
                secret = Data(trimmed.utf8)
            }
            services.append(Service(type: "turn", host: options.string("turn_host"), port: options.integer("turn_port"),
                                    transport: options.string("turn_transport"), authenticated: true))
        }
        self.services = services
        self.secret = secret
        ttl = options.integer("turn_ttl")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .server)
        registrar.iq(.get, "services", Self.namespace, target: .server) { [self] request in
            let type = request.payload[attribute: "type"]
            var answer = XMLElement(name: "services", namespace: Self.namespace)
            answer[attribute: "type"] = type
            for service in services where type == nil || service.type == type {
                answer.append(element(service, for: request.from))
            }
            return .result(answer)
        }
        registrar.iq(.get, "credentials", Self.namespace, target: .server) { [self] request in
            guard let wanted = request.payload.child("service", namespace: Self.namespace), let host = wanted[attribute: "host"],
                  let type = wanted[attribute: "type"] else { return .error(.badRequest, text: "name the service's host and type") }
            let port = wanted[attribute: "port"].flatMap { Int($0) }
            guard let service = services.first(where: { $0.host == host && $0.type == type && (port == nil || $0.port == port) }) else {
                return .error(.itemNotFound)
            }
            var credentials = XMLElement(name: "credentials", namespace: Self.namespace)
            credentials.append(element(service, for: request.from))
            return .result(credentials)
        }
    }

    private func element(_ service: Service, for requester: JID) -> XMLElement {
        var element = XMLElement(name: "service", namespace: Self.namespace, attributes: [
            "type": service.type, "host": service.host, "port": String(service.port), "transport": service.transport,
        ])
        if service.authenticated, let secret {
            // The TURN server recomputes the password from the username and the shared secret, and
            // refuses it once the expiry in the username has passed.
            let expiry = Int(Date().timeIntervalSince1970) + ttl
            let username = "\(expiry):\(requester.bare)"
            let password = Data(HMAC<Insecure.SHA1>.authenticationCode(for: Data(username.utf8), using: SymmetricKey(data: secret))).base64EncodedString()
            element[attribute: "username"] = username
            element[attribute: "password"] = password
            element[attribute: "expires"] = XMPPDateTime.string(Double(expiry))
            element[attribute: "restricted"] = "1"
        }
        return element
    }
}
