/// An HTTP request for paths a module serves (see `ModuleRegistrar.http(_:_:)`).
public struct ModuleHTTPRequest: Sendable {
    /// Upper case: `GET`, `HEAD`, `PUT`, `POST`, `DELETE`, `OPTIONS`.
    public var method: String
    /// The path's segments after `/<prefix>/<host>/`, percent-decoded.
    public var path: [String]
    /// Query parameters, percent-decoded (the last value of a repeated name).
    public var query: [String: String]
    /// Header fields by lower-case name; repeated fields joined with ", ".
    public var headers: [String: String]
    /// The client's address (a trusted proxy's `X-Forwarded-For` already applied).
    public var remoteAddress: String
    public var body: ModuleHTTPBody

    public init(method: String, path: [String], query: [String: String], headers: [String: String], remoteAddress: String, body: ModuleHTTPBody) {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.remoteAddress = remoteAddress
        self.body = body
    }
}

/// A request's body as it arrives, in chunks; read it once.
public struct ModuleHTTPBody: AsyncSequence, Sendable {
    public typealias Element = [UInt8]

    public struct AsyncIterator: AsyncIteratorProtocol {
        let nextChunk: () async throws -> [UInt8]?
        public mutating func next() async throws -> [UInt8]? { try await nextChunk() }
    }

    private let start: @Sendable () -> AsyncIterator

    /// `start` is called once per iteration and returns the function handing out the chunks in order.
    public init(_ start: @escaping @Sendable () -> (() async throws -> [UInt8]?)) {
        self.start = { AsyncIterator(nextChunk: start()) }
    }

    public func makeAsyncIterator() -> AsyncIterator { start() }

    /// No body.
    public static let empty = ModuleHTTPBody { { nil } }
}

/// A module's answer to an HTTP request.
public struct ModuleHTTPResponse: Sendable {
    public enum Body: Sendable {
        case bytes([UInt8])
        /// A file's contents, streamed from disk by the server.
        case file(path: String)
    }

    public var status: Int
    /// Header fields to send; `Content-Length` is set by the server.
    public var headers: [String: String]
    public var body: Body

    public init(status: Int, headers: [String: String] = [:], body: Body = .bytes([])) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// A short plain-text answer (errors, mostly).
    public static func text(_ status: Int, _ text: String, headers: [String: String] = [:]) -> ModuleHTTPResponse {
        ModuleHTTPResponse(status: status, headers: headers.merging(["Content-Type": "text/plain; charset=utf-8"]) { mine, _ in mine },
                           body: .bytes(Array((text + "\n").utf8)))
    }
}

/// Answers the HTTP requests under a module's prefix. Runs in a task of its own per request.
public typealias ModuleHTTPHandler = @Sendable (ModuleHTTPRequest) async -> ModuleHTTPResponse

/// One HTTP registration, as the core keeps it.
public struct HTTPRegistration: Sendable {
    public let prefix: String
    public let handler: ModuleHTTPHandler
}

extension ModuleRegistrar {
    /// Serves `/<prefix>/<host>/…` on every HTTP listener (`type: http`) with `handler`, for this module's
    /// host. `prefix` is one path segment (`upload`); two modules of a host claiming one prefix fail at start.
    public func http(_ prefix: String, _ handler: @escaping ModuleHTTPHandler) {
        addHTTP(HTTPRegistration(prefix: prefix, handler: handler))
    }
}
