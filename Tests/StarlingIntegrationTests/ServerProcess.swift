import Foundation
import XCTest

/// The real `starling` executable, started on loopback with ephemeral ports and a temporary data
/// directory, and stopped with SIGTERM like an operator would.
final class ServerProcess {
    let directory: URL
    let configPath: String
    let process = Process()
    private(set) var starttlsPort = 0
    private(set) var directTLSPort = 0
    private let output = Pipe()
    private let errors: FileHandle
    let errorLogPath: String

    static var buildDirectory: URL {
        // The test bundle sits next to the products it was built with.
        var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        while url.path != "/" && !FileManager.default.fileExists(atPath: url.appendingPathComponent("starling").path) {
            url.deleteLastPathComponent()
        }
        return url
    }

    static func executable(_ name: String) -> String { buildDirectory.appendingPathComponent(name).path }

    init(extraConfig: String = "", users: [(String, String)]) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        configPath = directory.appendingPathComponent("starling.yml").path
        let config = """
        hosts: [localhost, example.test]
        data_dir: data
        log_level: info
        listeners:
          - { address: 127.0.0.1, port: 0, tls: starttls }
          - { address: 127.0.0.1, port: 0, tls: direct }
        auth:
          failure_delay: 0.2
        \(extraConfig)
        """
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        for (user, password) in users {
            let (status, text) = try Self.run(Self.executable("starlingctl"), ["register", user, "localhost", password, "--config", configPath])
            XCTAssertEqual(status, 0, text)
        }
        errorLogPath = directory.appendingPathComponent("server.log").path
        FileManager.default.createFile(atPath: errorLogPath, contents: nil)
        errors = FileHandle(forWritingAtPath: errorLogPath)!
        process.executableURL = URL(fileURLWithPath: Self.executable("starling"))
        process.arguments = ["--config", configPath]
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        try waitUntilReady()
    }

    private func waitUntilReady() throws {
        let reader = output.fileHandleForReading
        var text = ""
        let deadline = Date().addingTimeInterval(60)
        while !text.contains("starling: ready\n") {
            guard Date() < deadline, process.isRunning else {
                throw NSError(domain: "ServerProcess", code: 1, userInfo: [NSLocalizedDescriptionKey:
                    "server did not start: \(text) \((try? String(contentsOfFile: errorLogPath, encoding: .utf8)) ?? "")"])
            }
            let data = reader.availableData
            if data.isEmpty { Thread.sleep(forTimeInterval: 0.05) }
            text += String(decoding: data, as: UTF8.self)
        }
        for line in text.split(separator: "\n") where line.hasPrefix("starling: listening") {
            let fields = line.split(separator: " ")
            let port = Int(fields.last!)!
            if fields[2] == "c2s-starttls" { starttlsPort = port } else { directTLSPort = port }
        }
    }

    /// Runs `starlingctl` against this server's config.
    func ctl(_ arguments: [String]) throws -> (Int32, String) {
        try Self.run(Self.executable("starlingctl"), arguments + ["--config", configPath])
    }

    var log: String { (try? String(contentsOfFile: errorLogPath, encoding: .utf8)) ?? "" }

    /// SIGTERM, then wait for a clean exit.
    @discardableResult
    func stop() -> Int32 {
        if process.isRunning {
            process.terminate()
            let deadline = Date().addingTimeInterval(20)
            while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        try? errors.close()
        return process.terminationStatus
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        try? FileManager.default.removeItem(at: directory)
    }

    static func run(_ executable: String, _ arguments: [String], stdin: String? = nil) throws -> (Int32, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        if let stdin {
            let input = Pipe()
            process.standardInput = input
            try process.run()
            input.fileHandleForWriting.write(Data(stdin.utf8))
            try input.fileHandleForWriting.close()
        } else {
            try process.run()
        }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// Runs the slixmpp client script (Tests/Interop/slixmpp_client.py).
    static func slixmpp(_ arguments: [String]) throws -> (Int32, String) {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Interop/slixmpp_client.py").path
        return try run("/usr/bin/env", ["python3", script] + arguments)
    }
}
