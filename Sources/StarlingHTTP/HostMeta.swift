import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

extension HTTPListenerSettings {
    /// Who sent `request` (see `peer(socket:forwardedFor:forwardedProto:)`).
    func peer(_ request: Request, _ context: StarlingRequestContext) -> HTTPPeer {
        peer(socket: context.remoteAddress, forwardedFor: request.headers[values: .xForwardedFor].joined(separator: ","),
             forwardedProto: request.headers[.xForwardedProto])
    }
}

extension HTTPField.Name {
    static let xForwardedFor = HTTPField.Name("X-Forwarded-For")!
    static let xForwardedProto = HTTPField.Name("X-Forwarded-Proto")!
}

/// The request context of Starling's HTTP listeners: Hummingbird's, plus who connected.
public struct StarlingRequestContext: RequestContext, RemoteAddressRequestContext {
    public var coreContext: CoreRequestContextStorage
    public let remoteAddress: SocketAddress?

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        remoteAddress = source.channel.remoteAddress
    }
}

/// XEP-0156 §3: `/.well-known/host-meta` (XRD) and `host-meta.json` (JRD) tell web clients where the
/// XMPP WebSocket and BOSH endpoints are.
enum HostMeta {
    static let webSocketRelation = "urn:xmpp:alt-connections:websocket"
    static let boshRelation = "urn:xmpp:alt-connections:xbosh"

    static func addRoutes(to router: Router<StarlingRequestContext>, settings: HTTPListenerSettings) {
        router.get("/.well-known/host-meta") { request, context -> Response in
            guard let (webSocket, bosh) = endpoints(request, context, settings) else { return badHost() }
            var xml = "<?xml version='1.0' encoding='utf-8'?>\n<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n"
            xml += "  <Link rel='\(webSocketRelation)' href='\(escapeXMLAttribute(webSocket))'/>\n"
            xml += "  <Link rel='\(boshRelation)' href='\(escapeXMLAttribute(bosh))'/>\n</XRD>\n"
            return document(xml, contentType: "application/xrd+xml; charset=utf-8")
        }
        router.get("/.well-known/host-meta.json") { request, context -> Response in
            guard let (webSocket, bosh) = endpoints(request, context, settings) else { return badHost() }
            let links: [String: Any] = ["links": [["rel": webSocketRelation, "href": webSocket], ["rel": boshRelation, "href": bosh]]]
            let json = (try? JSONSerialization.data(withJSONObject: links, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data()
            return document(String(decoding: json, as: UTF8.self) + "\n", contentType: "application/json")
        }
    }

    /// The WebSocket and BOSH URLs: the configured WebSocket URL, or ones built from the request (`wss` and
    /// `https` when TLS protects the request, here or at a trusted proxy, and the host the client asked for).
    static func endpoints(_ request: Request, _ context: StarlingRequestContext, _ settings: HTTPListenerSettings) -> (webSocket: String, bosh: String)? {
        guard let host = request.head.authority, isPlausibleHost(host) else { return nil }
        let secure = settings.peer(request, context).secure
        let webSocket = settings.publicWebSocketURL ?? "\(secure ? "wss" : "ws")://\(host)\(settings.webSocketPath)"
        // BOSH sits next to the WebSocket endpoint: on the configured URL's origin, or on this request's.
        var bosh = "\(secure ? "https" : "http")://\(host)/http-bind"
        if let configured = settings.publicWebSocketURL.flatMap(URLComponents.init(string:)), let configuredHost = configured.host {
            let scheme = configured.scheme == "ws" ? "http" : "https"
            bosh = "\(scheme)://\(configuredHost)\(configured.port.map { ":\($0)" } ?? "")/http-bind"
        }
        return (webSocket, bosh)
    }

    /// A `Host` header goes into the documents: only what a host name, an IP literal and a port consist of.
    static func isPlausibleHost(_ host: String) -> Bool {
        !host.isEmpty && host.utf8.count <= 255 && host.unicodeScalars.allSatisfy {
            CharacterSet.alphanumerics.contains($0) && $0.isASCII || ".-:[]".unicodeScalars.contains($0)
        }
    }

    static func escapeXMLAttribute(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "'", with: "&apos;")
            .replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    private static func document(_ text: String, contentType: String) -> Response {
        // Web clients on other origins read these (XEP-0156 §3.2 recommends CORS).
        Response(status: .ok, headers: [.contentType: contentType, .accessControlAllowOrigin: "*"],
                 body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    private static func badHost() -> Response {
        Response(status: .badRequest, headers: [.contentType: "text/plain; charset=utf-8"],
                 body: .init(byteBuffer: ByteBuffer(string: "missing or malformed Host header\n")))
    }
}
