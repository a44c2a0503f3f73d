import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import StarlingAPI
import StarlingFAST
import StarlingCluster
import StarlingConfig
import StarlingHTTP
import StarlingModules
import StarlingS2S
import StarlingSQLite
import StarlingStorage

/// The whole server as one long-lived `Service`: opens the store, binds the listeners and the admin
/// socket, and on graceful shutdown says `<system-shutdown/>` to every client before closing.
public final class StarlingServer: Service, @unchecked Sendable {
    private let configuration: StarlingConfiguration
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let threadPool: NIOThreadPool
    private let pluginModules: [String: any ServerModule.Type]

    /// - Parameter pluginModules: modules loaded from plugins while the configuration was read.
    public init(configuration: StarlingConfiguration, pluginModules: [String: any ServerModule.Type] = [:], logger: Logger,
                eventLoopGroup: MultiThreadedEventLoopGroup = .singleton) {
        self.configuration = configuration
        self.pluginModules = pluginModules
        self.logger = logger
        self.group = eventLoopGroup
        self.threadPool = NIOThreadPool.singleton
    }

    public func run() async throws {
        // Without a listener that serves them, metrics stay swift-metrics' no-ops and cost nothing.
        if configuration.httpListeners.contains(where: \.metrics) { ServerMetrics.bootstrapped }
        try FileManager.default.createDirectory(atPath: configuration.dataDirectory, withIntermediateDirectories: true)
        let store = try await StorageBackends.open(configuration, logger: logger)
        let tls = try TLSIdentity.load(configuration, logger: logger)
        let cluster: ClusterNode?
        do { cluster = try makeClusterNode(tls: tls, store: store) } catch {
            await store.close()
            throw error
        }
        let fastTokens: FASTTokens?
        do {
            fastTokens = configuration.auth.fast.mechanisms.isEmpty ? nil
                : FASTTokens(store: store, key: try FASTTokens.loadKey(configuration), settings: configuration.auth.fast)
        } catch {
            await store.close()
            throw error
        }
        let context = ServerContext(configuration: configuration, accounts: store, fastTokens: fastTokens, tls: tls, threadPool: threadPool,
                                    logger: logger, cluster: cluster)
        let router = context.router
        let services = ServiceDirectory()
        do {
            services.register(store as any AccountStore, as: (any AccountStore).self)
            services.register(store as any RosterStore, as: (any RosterStore).self)
            services.register(store as any OfflineStore, as: (any OfflineStore).self)
            services.register(store as any BlocklistStore, as: (any BlocklistStore).self)
            services.register(store as any PrivateXMLStore, as: (any PrivateXMLStore).self)
            services.register(store as any VCardStore, as: (any VCardStore).self)
            services.register(store as any LastActivityStore, as: (any LastActivityStore).self)
            services.register(store as any MUCStore, as: (any MUCStore).self)
            services.register(store as any ArchiveStore, as: (any ArchiveStore).self)
            services.register(store as any PubSubStore, as: (any PubSubStore).self)
            services.register(store as any PrivacyStore, as: (any PrivacyStore).self)
            services.register(store as any PushStore, as: (any PushStore).self)
            services.register(ServerPaths(configDirectory: URL(fileURLWithPath: configuration.sourcePath).deletingLastPathComponent().path,
                                          dataDirectory: configuration.dataDirectory), as: ServerPaths.self)
            for (name, reason) in configuration.pluginFailures {
                logger.error("plugin not loaded, running without it", metadata: ["plugin": "\(name)", "error": "\(reason)"])
            }
            let modules = try ModuleLoader.load(configuration: configuration, catalog: BuiltinModules.catalog.merging(pluginModules) { $1 },
                                                logger: logger, router: router, services: services)
            try router.install(modules: modules)
            ModuleLoader.activate(modules, replacing: [:])
        } catch {
            await store.close()
            throw error
        }
        let federation: Federation?
        do {
            federation = try FederationBridge.makeFederation(configuration, tls: tls, router: router, group: group, logger: logger)
        } catch {
            await store.close()
            throw error
        }
        router.federation = federation
        federation?.start(delegate: FederationBridge(router: router))
        context.reloads.withLockedValue {
            $0 = LiveReloads(configuration: configuration, pluginModules: pluginModules, logger: logger, router: router, services: services)
        }
        for host in configuration.hosts {
            logger.info("modules enabled", metadata: ["host": "\(host)", "modules": "\(configuration.modules(for: host).map(\.name).joined(separator: ", "))"])
        }
        let startedAt = Date()

        var channels: [any Channel] = []
        var httpListeners: [Task<Void, any Error>] = []
        do {
            // Linked before clients come, so the first sessions see the whole cluster.
            try await cluster?.start(delegate: ClusterBridge(registry: context.registry, router: router, detached: context.detached,
                                                                     resumptions: context.remoteResumptions))
            for listener in configuration.listeners {
                let channel = try await bind(listener, context: context)
                channels.append(channel)
                let port = channel.localAddress?.port ?? listener.port
                // One machine-readable line per listener: tests and scripts wait for these.
                logger.notice("listening", metadata: ["listener": "c2s-\(listener.tls.rawValue)", "address": "\(listener.address)", "port": "\(port)"])
                print("starling: listening c2s-\(listener.tls.rawValue) \(listener.address) \(port)")
            }
            for listener in configuration.s2s?.listeners ?? [] {
                guard let federation else { break }
                let channel = try await bindS2S(listener, federation: federation)
                channels.append(channel)
                let port = channel.localAddress?.port ?? listener.port
                logger.notice("listening", metadata: ["listener": "s2s-\(listener.tls.rawValue)", "address": "\(listener.address)", "port": "\(port)"])
                print("starling: listening s2s-\(listener.tls.rawValue) \(listener.address) \(port)")
            }
            let administration = ServerAdministration(server: context, store: store, startedAt: startedAt)
            for listener in configuration.httpListeners {
                let (port, task) = try await startHTTP(listener, context: context, administration: administration)
                httpListeners.append(task)
                let name = (listener.servesXMPP ? "http-" : "admin-") + (listener.directTLS ? "direct" : "none")
                logger.notice("listening", metadata: ["listener": "\(name)", "address": "\(listener.address)", "port": "\(port)"])
                print("starling: listening \(name) \(listener.address) \(port)")
            }
            channels.append(try await bindAdmin(context: context, startedAt: startedAt))
            print("starling: ready")
            fflush(stdout)
        } catch {
            for channel in channels { try? await channel.close() }
            for task in httpListeners { task.cancel() }
            await cluster?.stop()
            await store.close()
            throw error
        }

        // SIGHUP reloads the hook scripts, as `starlingctl reload-hooks` does.
        signal(SIGHUP, SIG_IGN)
        let hangup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
        hangup.setEventHandler { [logger] in
            let outcome = context.reloadHooks()
            if outcome.errors.isEmpty {
                logger.notice("SIGHUP: hooks reloaded", metadata: ["result": "\(outcome.summaries.joined(separator: "; "))"])
            } else {
                logger.error("SIGHUP: hooks not reloaded, the previous ones keep running", metadata: ["error": "\(outcome.errors.joined(separator: "; "))"])
            }
        }
        hangup.resume()
        defer { hangup.cancel() }

        // Runs until SIGTERM/SIGINT (graceful shutdown) or cancellation.
        try? await gracefulShutdown()

        logger.notice("shutting down", metadata: ["connections": "\(context.connections.count)"])
        for channel in channels { try? await channel.close() }
        // Modules say goodbye first (MUC rooms tell their occupants, status 332), then every stream closes.
        for host in configuration.hosts { _ = router.run(.serverStopping, ServerStoppingEvent(), on: host) }
        context.connections.shutdownAll()
        await federation?.shutdown()
        // Give clients a moment to receive the stream error and close their side.
        for _ in 0..<50 where context.connections.count > 0 { try? await Task.sleep(for: .milliseconds(20)) }
        // The HTTP listeners stopped accepting with the graceful shutdown and end once their connections
        // have; a plain HTTP client that keeps its connection open is not waited for long.
        await Self.finish(httpListeners, within: .seconds(2))
        // The sessions' goodbyes have gone over the links; now the other nodes may forget this one.
        await cluster?.stop()
        await drainModules(configuration.hosts, router: router)
        await store.close()
        try? FileManager.default.removeItem(atPath: configuration.admin.socketPath)
        logger.notice("stopped")
    }


    /// Lets modules finish what they still owe storage (archive writes), for at most `limit` seconds.
    private func drainModules(_ hosts: [String], router: Router, limit: Double = 10) async {
        let event = ServerDrainingEvent()
        for host in hosts { _ = router.run(.serverDraining, event, on: host) }
        let work = event.work
        guard !work.isEmpty else { return }
        let finished = await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await withTaskGroup(of: Void.self) { all in
                    for item in work { all.addTask { await item() } }
                }
                return true
            }
            group.addTask {
                try? await Task.sleep(for: .seconds(limit))
                return false
            }
            let first = await group.next() ?? false
            group.cancelAll()
            return first
        }
        if !finished { logger.error("modules did not finish their storage work in time; some of it is lost", metadata: ["seconds": "\(limit)"]) }
    }

    private func makeClusterNode(tls: TLSIdentity, store: any StarlingStore) throws -> ClusterNode? {
        guard let settings = configuration.cluster else { return nil }
        guard let secret = FileManager.default.contents(atPath: settings.secretFile) else {
            throw TLSSetupError("cannot read the cluster secret file \(settings.secretFile)")
        }
        let trimmed = String(decoding: secret, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return try ClusterNode(
            settings: .init(cluster: settings.name, node: settings.node, linkHost: settings.linkHost, linkPort: settings.linkPort,
                            secret: Array(trimmed.utf8), discoverThroughDatabase: settings.discovery == .postgresql, peers: settings.peers,
                            heartbeat: settings.heartbeat, deadAfter: settings.deadAfter),
            group: group, serverTLS: tls.context, ownCertificateDigest: tls.channelBinding.data,
            digestOfPeerCertificate: { TLSIdentity.serverEndPointHash(der: $0) },
            membership: store as? any ClusterMembershipStore, logger: logger
        )
    }

    private func bind(_ listener: ListenerConfiguration, context: ServerContext) async throws -> any Channel {
        let settings = context.settings(for: listener)
        let logger = self.logger
        let limits = configuration.limits
        let tls = context.tls
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: Int32(listener.backlog))
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            // One socket read of at most 8 KiB per client per loop turn: a client with a deep backlog is
            // read in small steps with everyone else's reads in between (a few hundred stanzas at most, a
            // couple of milliseconds of work), and a read hold (read rate, backpressure) takes effect
            // after one such step.
            .childChannelOption(ChannelOptions.maxMessagesPerRead, value: 1)
            .childChannelOption(ChannelOptions.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 256, initial: 2048, maximum: 8192))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if listener.proxyProtocol {
                        try sync.addHandler(ProxyProtocolHandler(timeout: .milliseconds(Int64(limits.authTimeout * 1000)), logger: logger))
                    }
                    if listener.tls == .direct {
                        try sync.addHandler(NIOSSLServerHandler(context: tls.context))
                    }
                    // Half: the first silence gets a ping, the second closes (see C2SHandler). Write idleness is
                    // C2SHandler's own business: IdleStateHandler would make a promise for every write.
                    try sync.addHandler(IdleStateHandler(readTimeout: .milliseconds(Int64(limits.idleTimeout * 500))))
                    try sync.addHandler(C2SHandler(server: context, settings: settings, transport: .tcp(directTLS: listener.tls == .direct)))
                }
            }
        do {
            return try await bootstrap.bind(host: listener.address, port: listener.port).get()
        } catch {
            throw TLSSetupError("cannot listen on \(listener.address):\(listener.port): \(error)")
        }
    }

    private func bindS2S(_ listener: ListenerConfiguration, federation: Federation) async throws -> any Channel {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: Int32(listener.backlog))
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try federation.initializeIncoming(channel, directTLS: listener.tls == .direct)
                }
            }
        do {
            return try await bootstrap.bind(host: listener.address, port: listener.port).get()
        } catch {
            throw TLSSetupError("cannot listen on \(listener.address):\(listener.port): \(error)")
        }
    }

    /// Waits for `tasks` to end, cancelling those still running after `limit`.
    private static func finish(_ tasks: [Task<Void, any Error>], within limit: Duration) async {
        let deadline = Task {
            try await Task.sleep(for: limit)
            for task in tasks { task.cancel() }
        }
        for task in tasks { _ = try? await task.value }
        deadline.cancel()
    }

    /// Starts an HTTP listener and returns its port once it accepts connections, with the task serving it.
    private func startHTTP(_ listener: HTTPListenerConfiguration, context: ServerContext,
                           administration: ServerAdministration) async throws -> (Int, Task<Void, any Error>) {
        let limits = configuration.limits
        var metrics: (@Sendable () -> String)?
        if listener.metrics { metrics = { ServerMetrics.render(context) } }
        var settings = HTTPListenerSettings(
            address: listener.address, port: listener.port, backlog: listener.backlog,
            tls: listener.directTLS ? context.tls.context : nil, trustedProxies: Set(listener.trustedProxies),
            maxMessageBytes: limits.maxStanzaSize, idleTimeout: Int64(limits.idleTimeout),
            publicWebSocketURL: listener.publicWebSocketURL,
            metrics: metrics
        )
        settings.servesXMPP = listener.servesXMPP
        if let tokenFile = listener.adminTokenFile {
            // Checked when the configuration was read; read here so a new token applies at restart.
            guard let token = try? String(contentsOfFile: tokenFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines), token.count >= 32 else {
                throw TLSSetupError("cannot read the admin token from \(tokenFile) (at least 32 characters)")
            }
            settings.admin = AdminAPISettings(backend: administration, token: token)
        }
        let (started, announce) = AsyncStream<Int>.makeStream()
        let service = HTTPListener(settings: settings, eventLoopGroup: group, logger: logger, installSession: { channel, peer, kind in
            let sync = channel.pipeline.syncOperations
            try sync.addHandler(IdleStateHandler(readTimeout: .milliseconds(Int64(limits.idleTimeout * 500))))
            let transport: C2STransport = kind == .webSocket ? .webSocket(peer) : .bosh(peer)
            try sync.addHandler(C2SHandler(server: context, settings: context.httpSettings(), transport: transport))
        }, moduleHandler: { prefix, host in
            context.router.modules[host]?.httpHandlers[prefix]
        }, onRunning: { port in
            announce.yield(port)
            announce.finish()
        })
        let task = Task {
            defer { announce.finish() }
            try await service.run()
        }
        var ports = started.makeAsyncIterator()
        guard let port = await ports.next() else {
            // It stopped before it listened: its error says why (an address in use, say).
            do { try await task.value } catch { throw TLSSetupError("cannot listen on \(listener.address):\(listener.port): \(error)") }
            throw TLSSetupError("cannot listen on \(listener.address):\(listener.port)")
        }
        return (port, task)
    }

    private func bindAdmin(context: ServerContext, startedAt: Date) async throws -> any Channel {
        let path = configuration.admin.socketPath
        try? FileManager.default.removeItem(atPath: path)
        let channel = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineDecoder()))
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(server: context, startedAt: startedAt))
                }
            }
            .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
        chmod(path, 0o600)
        return channel
    }
}
