import Foundation
import StarlingAPI

/// Passwords decided by an external program speaking ejabberd's extauth protocol, so existing
/// ejabberd auth scripts work unchanged. Each request is `auth:USER:HOST:PASSWORD` preceded by its
/// length as two big-endian bytes; the answer is two length bytes (0x0002) and 0x0001 (accept) or
/// 0x0000 (refuse). Enable the module and set `auth.method: external_auth` for the hosts it decides.
public final class ExternalAuthModule: ServerModule {
    public static let descriptor = ModuleDescriptor(
        name: "external_auth", summary: "Passwords checked by an external program (ejabberd extauth protocol).",
        options: [
            ModuleOptionSpec("program", .string(choices: nil), default: .string(""), doc: "The program to start (absolute path, or relative to the config file)."),
            ModuleOptionSpec("timeout", .number(0.1...60), default: .number(5), doc: "Seconds the program may take to answer; no answer refuses the login."),
        ]
    )

    private let worker: ExtauthProcess

    public init(host: any ModuleHost) throws {
        var program = host.options.string("program")
        guard !program.isEmpty else { throw ExternalAuthError("external_auth needs the program option") }
        if !program.hasPrefix("/"), let base = host.service(ServerPaths.self)?.configDirectory { program = base + "/" + program }
        guard FileManager.default.isExecutableFile(atPath: program) else { throw ExternalAuthError("external_auth: \(program) is not an executable file") }
        worker = ExtauthProcess(program: program, timeout: host.options.number("timeout"), log: { [host] in host.log(.warning, $0) })
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.authenticator { [worker] request in
            try await worker.check(user: request.username, host: request.host, password: request.password)
        }
    }
}

struct ExternalAuthError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// One long-running program, asked one question at a time on its own queue (it speaks a strictly
/// sequential protocol); restarted when it exits or stops answering.
final class ExtauthProcess: @unchecked Sendable {
    private let program: String
    private let timeout: Double
    private let log: @Sendable (String) -> Void
    private let queue = DispatchQueue(label: "starling.external-auth")
    private var process: Process?
    private var input: FileHandle?
    private var output: FileHandle?

    init(program: String, timeout: Double, log: @escaping @Sendable (String) -> Void) {
        self.program = program
        self.timeout = timeout
        self.log = log
    }

    func check(user: String, host: String, password: String) async throws -> Bool {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                do { continuation.resume(returning: try self.ask("auth:\(user):\(host):\(password)")) } catch {
                    self.stop()
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// On the queue only.
    private func ask(_ request: String) throws -> Bool {
        if process?.isRunning != true { try start() }
        guard let input, let output else { throw ExternalAuthError("external_auth: the program is not running") }
        let bytes = Array(request.utf8)
        guard bytes.count <= 65_535 else { return false }
        try input.write(contentsOf: [UInt8(bytes.count >> 8), UInt8(bytes.count & 0xFF)] + bytes)
        let reply = try read(4, from: output)
        return reply[2] == 0 && reply[3] == 1
    }

    private func read(_ count: Int, from handle: FileHandle) throws -> [UInt8] {
        var bytes: [UInt8] = []
        let deadline = Date().addingTimeInterval(timeout)
        while bytes.count < count {
            var descriptor = pollfd(fd: handle.fileDescriptor, events: Int16(POLLIN), revents: 0)
            let remaining = Int32(max(0, deadline.timeIntervalSinceNow) * 1000)
            guard poll(&descriptor, 1, remaining) > 0 else { throw ExternalAuthError("external_auth: \(program) did not answer within \(timeout) s") }
            let chunk = handle.availableData
            guard !chunk.isEmpty else { throw ExternalAuthError("external_auth: \(program) closed its output") }
            bytes += chunk
        }
        return bytes
    }

    private func start() throws {
        stop()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: program)
        let stdin = Pipe(), stdout = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        do { try process.run() } catch { throw ExternalAuthError("external_auth: cannot start \(program): \(error)") }
        self.process = process
        input = stdin.fileHandleForWriting
        output = stdout.fileHandleForReading
        log("external_auth: started \(program)")
    }

    private func stop() {
        if let process, process.isRunning { process.terminate() }
        process = nil
        input = nil
        output = nil
    }
}

@_cdecl("starling_plugin_api_version")
public func starlingPluginAPIVersion() -> Int { StarlingAPIVersion.compiledAPI }

@_cdecl("starling_plugin_module")
public func starlingPluginModule() -> UnsafeMutableRawPointer { StarlingPlugin.export(ExternalAuthModule.self) }
