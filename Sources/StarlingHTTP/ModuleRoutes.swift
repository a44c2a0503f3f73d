import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import StarlingAPI

/// `/<prefix>/<host>/…`: requests for paths modules registered (`ModuleRegistrar.http`), translated to and
/// from the plugin API's plain types.
enum ModuleRoutes {
    static let methods: [HTTPRequest.Method] = [.get, .head, .put, .post, .delete, .options]

    static func add(to router: Router<StarlingRequestContext>, settings: HTTPListenerSettings,
                    lookup: @escaping @Sendable (_ prefix: String, _ host: String) -> ModuleHTTPHandler?) {
        let fileIO = FileIO()
        for method in methods {
            router.on("/{prefix}/{host}/**", method: method) { request, context -> Response in
                guard let prefix = context.parameters.get("prefix"), let host = context.parameters.get("host")?.lowercased(),
                      let handler = lookup(prefix, host) else {
                    return Response(status: .notFound)
                }
                let answer = await handler(moduleRequest(request, context, settings: settings))
                return try await response(answer, method: request.method, context: context, fileIO: fileIO)
            }
        }
    }

    static func moduleRequest(_ request: Request, _ context: StarlingRequestContext, settings: HTTPListenerSettings) -> ModuleHTTPRequest {
        var headers: [String: String] = [:]
        for field in request.headers {
            let name = field.name.canonicalName.lowercased()
            headers[name] = headers[name].map { "\($0), \(field.value)" } ?? field.value
        }
        let path = context.parameters.getCatchAll().map { String($0).removingPercentEncoding ?? String($0) }
        var query: [String: String] = [:]
        for (name, value) in request.uri.queryParameters { query[String(name)] = String(value) }
        let body = request.body
        return ModuleHTTPRequest(
            method: request.method.rawValue, path: path, query: query, headers: headers,
            remoteAddress: settings.peer(request, context).address,
            body: ModuleHTTPBody {
                var chunks = body.makeAsyncIterator()
                return { try await chunks.next().map { Array(buffer: $0) } }
            }
        )
    }

    static func response(_ answer: ModuleHTTPResponse, method: HTTPRequest.Method, context: StarlingRequestContext, fileIO: FileIO) async throws -> Response {
        var headers = HTTPFields()
        for (name, value) in answer.headers {
            guard let field = HTTPField.Name(name), field != .contentLength else { continue }
            headers[field] = value
        }
        let status = HTTPResponse.Status(code: answer.status)
        switch answer.body {
        case .bytes(let bytes):
            return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
        case .file(let path):
            if method == .head {
                let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
                headers[.contentLength] = String(size)
                return Response(status: status, headers: headers, body: .init())
            }
            return Response(status: status, headers: headers, body: try await fileIO.loadFile(path: path, context: context))
        }
    }
}
