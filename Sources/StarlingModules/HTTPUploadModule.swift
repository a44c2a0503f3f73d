import Foundation
import StarlingAPI
import Synchronization

/// XEP-0363 HTTP File Upload: a component at `upload.<host>` hands out slots (a PUT URL signed to expire,
/// and the GET URL), and the server's HTTP listeners take the upload at `/upload/<host>/…` and serve the
/// file. Files live on disk with a per-file limit, a per-user quota and an age after which they go.
public final class HTTPUploadModule: ServerModule, ActivatableModule {
    public static let namespace = "urn:xmpp:http:upload:0"
    public static let descriptor = ModuleDescriptor(
        name: "http_upload", summary: "File upload for clients (XEP-0363) at upload.<host>, served by the http listeners.", xeps: ["XEP-0363"],
        options: [
            ModuleOptionSpec("base_url", .string(choices: nil), default: .string(""),
                             doc: "The URL at which clients reach an http listener (https://chat.example.com:5443); slot URLs start with it. Required."),
            ModuleOptionSpec("domain", .string(choices: nil), default: .string("upload.@HOST@"), doc: "The service's domain; @HOST@ stands for the host."),
            ModuleOptionSpec("name", .string(choices: nil), default: .string("HTTP File Upload"), doc: "The service's name in service discovery."),
            ModuleOptionSpec("directory", .string(choices: nil), default: .string("upload"),
                             doc: "Where files are kept, relative to data_dir; one folder per host below it. Share it between the nodes of a cluster."),
            ModuleOptionSpec("access", .accessRule, default: .string("all"), doc: "Which of the host's users may request upload slots."),
            ModuleOptionSpec("max_file_size", .integer(1...1 << 40), default: .integer(104_857_600), doc: "Largest file in bytes."),
            ModuleOptionSpec("quota", .integer(0...1 << 50), default: .integer(1_073_741_824), doc: "Bytes one user may keep stored (0: no quota)."),
            ModuleOptionSpec("expire_after", .integer(0...315_360_000), default: .integer(604_800),
                             doc: "Seconds after which an uploaded file is deleted (0: kept until purged by hand)."),
            ModuleOptionSpec("slot_lifetime", .integer(10...86_400), default: .integer(300), doc: "Seconds a PUT URL stays valid."),
            ModuleOptionSpec("secret_file", .string(choices: nil), default: .string(""),
                             doc: "A file holding the secret that signs PUT URLs, relative to the config file; every node of a cluster needs the same. Empty: one is generated in data_dir."),
        ]
    )

    private let host: any ModuleHost
    private let domain: String
    private let name: String
    private let baseURL: String
    private let files: UploadFiles
    private let signer: UploadSlotSigner
    /// The access rule a user must pass to get slots.
    private let access: String
    private let maxFileSize: Int
    private let quota: Int
    private let expireAfter: Int
    private let slotLifetime: Int
    private let purging = PurgeLoop()

    public init(host: any ModuleHost) throws {
        self.host = host
        let options = host.options
        var base = options.string("base_url")
        while base.hasSuffix("/") { base.removeLast() }
        guard let url = URL(string: base), ["http", "https"].contains(url.scheme ?? ""), url.host != nil else {
            throw ModuleStartError("http_upload needs base_url: the http(s) URL at which clients reach an http listener, e.g. https://\(host.domain):5443")
        }
        baseURL = base
        domain = options.string("domain").replacingOccurrences(of: "@HOST@", with: host.domain)
        guard let service = JID(domain), service.localpart == nil, service.resourcepart == nil else {
            throw ModuleStartError("http_upload domain '\(domain)' is not a domain name")
        }
        name = options.string("name")
        let paths = host.service(ServerPaths.self)
        let dataDirectory = URL(fileURLWithPath: paths?.dataDirectory ?? FileManager.default.currentDirectoryPath)
        let directory = options.string("directory")
        let root = directory.hasPrefix("/") ? URL(fileURLWithPath: directory) : dataDirectory.appendingPathComponent(directory)
        do { files = try UploadFiles(directory: root.appendingPathComponent(host.domain)) } catch {
            throw ModuleStartError("http_upload cannot use \(root.path): \(error)")
        }
        signer = UploadSlotSigner(secret: try Self.secret(options.string("secret_file"), configDirectory: paths?.configDirectory, dataDirectory: dataDirectory))
        access = options.string("access")
        maxFileSize = options.integer("max_file_size")
        quota = options.integer("quota")
        expireAfter = options.integer("expire_after")
        slotLifetime = options.integer("slot_lifetime")
    }

    /// The configured secret, or the one generated in the data directory on first start.
    private static func secret(_ file: String, configDirectory: String?, dataDirectory: URL) throws -> [UInt8] {
        if !file.isEmpty {
            let base = configDirectory ?? FileManager.default.currentDirectoryPath
            let path = file.hasPrefix("/") ? file : URL(fileURLWithPath: base).appendingPathComponent(file).path
            guard let text = try? String(contentsOfFile: path, encoding: .utf8),
                  case let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines), trimmed.utf8.count >= 16 else {
                throw ModuleStartError("http_upload: cannot read a secret of at least 16 bytes from \(path)")
            }
            return Array(trimmed.utf8)
        }
        let generated = dataDirectory.appendingPathComponent("upload.secret")
        if let existing = try? Data(contentsOf: generated), existing.count >= 16 { return Array(existing) }
        let secret = (0..<32).map { _ in UInt8.random(in: 0...255) }
        try? FileManager.default.createDirectory(at: dataDirectory, withIntermediateDirectories: true)
        guard FileManager.default.createFile(atPath: generated.path, contents: Data(secret), attributes: [.posixPermissions: 0o600]) else {
            throw ModuleStartError("http_upload: cannot write \(generated.path)")
        }
        return secret
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.component(domain, name: name) { [self] input in
            Task { await receive(input) }
        }
        registrar.http("upload") { [self] request in await serve(request) }
    }

    public func activated() {
        let files = files, expireAfter = expireAfter, host = host
        purging.start {
            let (count, bytes) = files.purge(maxAge: expireAfter, now: Self.now())
            if count > 0 { host.log(.info, "http_upload: \(count) expired file(s) deleted, \(bytes) bytes") }
        }
    }

    public func deactivated() {
        purging.stop()
    }

    /// Deletes expired uploads now (the module does so hourly by itself).
    public func purgeExpired() -> (files: Int, bytes: Int) {
        files.purge(maxAge: expireAfter, now: Self.now())
    }

    static func now() -> Int { Int(Date().timeIntervalSince1970) }

    // MARK: XMPP

    private func receive(_ input: ComponentStanza) async {
        let stanza = input.stanza
        guard stanza.name == "iq", let type = stanza[attribute: "type"], type == "get" || type == "set",
              let payload = stanza.elements.first else { return }
        guard input.to.localpart == nil else { return answer(input, .error(.serviceUnavailable)) }
        switch (type, payload.name, payload.namespace) {
        case ("get", "query", "http://jabber.org/protocol/disco#info"):
            answer(input, .result(info()))
        case ("get", "query", "http://jabber.org/protocol/disco#items"):
            answer(input, .result(XMLElement(name: "query", namespace: "http://jabber.org/protocol/disco#items")))
        case ("get", "request", Self.namespace):
            answer(input, slot(for: payload, from: input.from))
        default:
            answer(input, .error(.serviceUnavailable))
        }
    }

    private func info() -> XMLElement {
        let discoInfo = "http://jabber.org/protocol/disco#info"
        var query = XMLElement(name: "query", namespace: discoInfo)
        query.append(XMLElement(name: "identity", namespace: discoInfo, attributes: ["category": "store", "type": "file", "name": name]))
        for feature in [discoInfo, "http://jabber.org/protocol/disco#items", Self.namespace] {
            query.append(XMLElement(name: "feature", namespace: discoInfo, attributes: ["var": feature]))
        }
        query.append(DataForm(type: .result, formType: Self.namespace, fields: [DataForm.Field("max-file-size", values: [String(maxFileSize)])]).element)
        return query
    }

    private func slot(for request: XMLElement, from: JID) -> IQResponse {
        // Users of this host only: the quota and the storage are theirs.
        guard from.domainpart == host.domain, from.localpart != nil else { return .error(.forbidden, text: "only users of \(host.domain) may upload here") }
        guard host.allows(access, user: from.bare, address: nil) else { return .error(.forbidden, text: "you may not upload files here") }
        guard let filename = request[attribute: "filename"], let size = request[attribute: "size"].flatMap({ Int($0) }), size > 0 else {
            return .error(.badRequest, text: "a slot request needs a filename and a positive size")
        }
        if let problem = UploadSlot.problem(withFilename: filename) { return .error(.badRequest, text: problem) }
        let contentType = request[attribute: "content-type"] ?? ""
        guard contentType.utf8.count <= 255, !contentType.contains(where: { $0.isNewline }) else { return .error(.badRequest, text: "bad content-type") }
        guard size <= maxFileSize else {
            var tooLarge = XMLElement(name: "file-too-large", namespace: Self.namespace)
            tooLarge.append(XMLElement(name: "max-file-size", namespace: Self.namespace).with(text: String(maxFileSize)))
            return .failure(StanzaError(.notAcceptable, application: tooLarge, text: "files may have at most \(maxFileSize) bytes"))
        }
        let now = Self.now()
        let slot = UploadSlot(host: host.domain, id: UploadSlot.newID(), filename: filename, size: size, contentType: contentType,
                              expires: now + slotLifetime)
        do {
            guard try files.reserve(slot, owner: from.bare.description, quota: quota, now: now) else {
                return .error(.resourceConstraint, text: "your uploads would exceed your quota of \(quota) bytes")
            }
        } catch {
            host.log(.error, "http_upload: cannot reserve a slot: \(error)")
            return .error(.internalServerError)
        }
        let path = UploadSlotSigner.path(of: slot)
        var answer = XMLElement(name: "slot", namespace: Self.namespace)
        answer.append(XMLElement(name: "put", namespace: Self.namespace, attributes: ["url": "\(baseURL)\(path)?\(signer.putQuery(for: slot))"]))
        answer.append(XMLElement(name: "get", namespace: Self.namespace, attributes: ["url": baseURL + path]))
        return .result(answer)
    }

    private func answer(_ input: ComponentStanza, _ response: IQResponse) {
        host.route(input.reply(response))
    }

    // MARK: HTTP

    /// Browsers upload from the web client's origin and show files on it (XEP-0363 §7).
    private static let cors = [
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, HEAD, PUT, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Content-Length",
        "Access-Control-Max-Age": "86400",
    ]
    /// What users upload is served from the server's own origin: never as something a browser runs.
    private static let contentSafety = [
        "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; sandbox",
        "X-Content-Type-Options": "nosniff",
    ]

    private func serve(_ request: ModuleHTTPRequest) async -> ModuleHTTPResponse {
        guard request.path.count == 2, let record = files.record(id: request.path[0]), record.name == request.path[1] else {
            return request.method == "OPTIONS" ? ModuleHTTPResponse(status: 204, headers: Self.cors) : .text(404, "no such file", headers: Self.cors)
        }
        let id = request.path[0]
        switch request.method {
        case "OPTIONS":
            return ModuleHTTPResponse(status: 204, headers: Self.cors)
        case "GET", "HEAD":
            guard record.complete else { return .text(404, "not uploaded yet", headers: Self.cors) }
            var headers = Self.cors.merging(Self.contentSafety) { $1 }
            headers["Content-Type"] = record.contentType.isEmpty ? "application/octet-stream" : record.contentType
            headers["Cache-Control"] = "public, max-age=31536000, immutable"
            return ModuleHTTPResponse(status: 200, headers: headers, body: .file(path: files.fileURL(id: id, name: record.name).path))
        case "PUT":
            return await upload(request, id: id, record: record)
        default:
            return .text(405, "GET, HEAD, PUT or OPTIONS", headers: Self.cors.merging(["Allow": "GET, HEAD, PUT, OPTIONS"]) { $1 })
        }
    }

    private func upload(_ request: ModuleHTTPRequest, id: String, record: UploadFiles.Record) async -> ModuleHTTPResponse {
        let slot = UploadSlot(host: host.domain, id: id, filename: record.name, size: record.size, contentType: record.contentType,
                              expires: Int(request.query["e"] ?? "") ?? 0)
        guard let signature = request.query["h"], signer.accepts(slot, signature: signature, now: Self.now()) else {
            return .text(403, "this upload URL is not valid (or no longer)", headers: Self.cors)
        }
        let length = request.headers["content-length"].flatMap { Int($0) }
        guard let length, length == record.size else {
            let status = length == nil ? 411 : (length! > record.size ? 413 : 400)
            return .text(status, "the body must be exactly \(record.size) bytes, as requested for the slot", headers: Self.cors)
        }
        // Browsers add "; charset=…" to text types; the type itself must be what the slot was for.
        let declared = request.headers["content-type"]?.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
        if !record.contentType.isEmpty, declared != record.contentType.split(separator: ";").first.map({ $0.trimmingCharacters(in: .whitespaces).lowercased() }) {
            return .text(400, "the Content-Type must be \(record.contentType), as requested for the slot", headers: Self.cors)
        }
        do {
            switch try await files.store(id: id, body: request.body) {
            case .stored: return ModuleHTTPResponse(status: 201, headers: Self.cors)
            case .alreadyUploaded: return .text(409, "this slot was used already", headers: Self.cors)
            case .sizeMismatch: return .text(400, "the body was not \(record.size) bytes", headers: Self.cors)
            case .noSuchSlot: return .text(404, "no such slot", headers: Self.cors)
            }
        } catch {
            host.log(.error, "http_upload: storing an upload failed: \(error)")
            return .text(500, "the file could not be stored", headers: Self.cors)
        }
    }
}

/// Runs a job now and then every hour until stopped.
private final class PurgeLoop: Sendable {
    private let task = Mutex<Task<Void, Never>?>(nil)

    func start(_ job: @escaping @Sendable () -> Void) {
        let started = Task {
            while !Task.isCancelled {
                job()
                try? await Task.sleep(for: .seconds(3600))
            }
        }
        task.withLock { $0?.cancel(); $0 = started }
    }

    func stop() {
        task.withLock { $0?.cancel(); $0 = nil }
    }
}
