import ArgumentParser
import Foundation
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import StarlingConfig
import StarlingModules
import StarlingServer

@main
struct StarlingCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "starling",
        abstract: "The Starling XMPP server."
    )

    @Option(name: .shortAndLong, help: "Path of the configuration file.")
    var config: String = "config/starling.yml"

    @Flag(help: "Print every configuration option with its type, default and documentation, then exit.")
    var configReference = false

    @Flag(help: "Validate the configuration file and exit.")
    var check = false

    func run() async throws {
        // A peer that goes away mid-write (an external auth program, a client) must cost an EPIPE on
        // that write, not the whole process. NIO does the same once it opens a socket; this covers the
        // start before that.
        signal(SIGPIPE, SIG_IGN)
        // Swift concurrency runs on the server's event loops (NIO's singleton group, which the server
        // listens on) instead of a thread pool of its own: a login's store calls and the modules' hook
        // jobs then resume where the session's I/O is, without waking a second set of threads (about a
        // tenth of a login's server CPU here). So no task may block: disk and database work have their
        // own threads. Installed before the server starts any task.
        NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
        if configReference {
            print(StarlingConfiguration.referenceText(moduleCatalog: BuiltinModules.descriptors))
            return
        }
        let configuration: StarlingConfiguration
        let plugins = LoadedPlugins()
        do {
            configuration = try StarlingConfiguration.load(path: config, moduleCatalog: BuiltinModules.descriptors, loadPlugin: plugins.load)
        } catch {
            FileHandle.standardError.write(Data("starling: configuration error: \(error)\n".utf8))
            throw ExitCode(78) // EX_CONFIG
        }
        for (name, reason) in configuration.pluginFailures.sorted(by: { $0.key < $1.key }) {
            FileHandle.standardError.write(Data("starling: plugin \(name) not loaded, running without it: \(reason)\n".utf8))
        }
        if check {
            print("\(config): OK")
            return
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = configuration.logLevel
            return handler
        }
        let logger = Logger(label: "starling")
        let server = StarlingServer(configuration: configuration, pluginModules: plugins.modules, logger: logger)
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: server)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger
        ))
        do {
            try await group.run()
        } catch {
            logger.critical("server failed", metadata: ["error": "\(error)"])
            FileHandle.standardError.write(Data("starling: \(error)\n".utf8))
            throw ExitCode.failure
        }
    }
}
