// swift-tools-version:6.0
import PackageDescription

// Language mode 5 for now: the NIO handlers pass non-Sendable state between loop-bound closures in the
// way NIO documents; moving to Swift 6 mode is tracked as follow-up work.
let swiftSettings: [SwiftSetting] = [.swiftLanguageMode(.v5)]

let package = Package(
    name: "starling",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "starling", targets: ["starling"]),
        .executable(name: "starlingctl", targets: ["starlingctl"]),
        .executable(name: "starling-bench", targets: ["starling-bench"]),
    ],
    dependencies: [
        .package(path: "PluginAPI"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        // 3.x builds markedly faster than 4.x and has everything SCRAM needs (PBKDF2 in _CryptoExtras).
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"4.0.0"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/vapor/sqlite-nio.git", from: "1.13.2"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird-websocket.git", from: "2.8.1"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // C: only StarlingXML sees libxml2.
        .systemLibrary(
            name: "CLibXML2",
            pkgConfig: "libxml-2.0",
            providers: [.apt(["libxml2-dev"])]
        ),
        .target(
            name: "StarlingXML",
            dependencies: ["CLibXML2", .product(name: "StarlingAPI", package: "PluginAPI")],
            swiftSettings: swiftSettings
        ),
        // C: only CLuaSandbox sees Lua's API; every call that can raise a Lua error stays in its C, and
        // StarlingLua imports it privately.
        .systemLibrary(
            name: "CLua",
            pkgConfig: "lua5.4",
            providers: [.apt(["liblua5.4-dev"])]
        ),
        .target(name: "CLuaSandbox", dependencies: ["CLua"]),
        .target(
            name: "StarlingLua",
            dependencies: [
                "CLuaSandbox", "StarlingStorage",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "StarlingSASL",
            dependencies: [
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "StarlingFAST",
            dependencies: ["StarlingSASL", "StarlingStorage", "StarlingConfig", .product(name: "StarlingAPI", package: "PluginAPI")],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "StarlingConfig",
            dependencies: [
                "Yams",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "StarlingAPI", package: "PluginAPI"),
            ],
            swiftSettings: swiftSettings
        ),
        // Message archives (XEP-0313): the module for accounts' archives, and the query and batched-write
        // machinery rooms use for theirs.
        .target(
            name: "StarlingMAM",
            dependencies: ["StarlingStorage", "StarlingXML", .product(name: "StarlingAPI", package: "PluginAPI")],
            swiftSettings: swiftSettings
        ),
        // Multi-user chat (XEP-0045): a module written against the plugin API and the storage protocols.
        .target(
            name: "StarlingMUC",
            dependencies: [
                "StarlingStorage", "StarlingMAM",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: swiftSettings
        ),
        // Publish-subscribe (XEP-0060) and personal eventing (XEP-0163): a module written against the plugin API
        // and the storage protocols.
        .target(
            name: "StarlingPubSub",
            dependencies: [
                "StarlingStorage", "StarlingXML",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: swiftSettings
        ),
        // Clustering: node links (framing, handshake, pings), membership through the shared database, and
        // the replicated session table's wire form. The server supplies the table and routing.
        .target(
            name: "StarlingCluster",
            dependencies: [
                "StarlingStorage",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        // C: DNS SRV and address lookups through glibc's resolver, for federation only.
        .target(name: "CResolv", linkerSettings: [.linkedLibrary("resolv")]),
        .target(name: "CSQLiteOptions"),
        // Federation (RFC 6120 server-to-server): s2s stream state machines, TLS with SASL EXTERNAL (XEP-0178)
        // or Server Dialback (XEP-0220), outgoing streams per domain pair. The server supplies routing.
        .target(
            name: "StarlingS2S",
            dependencies: [
                "StarlingXML", "CResolv",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        // Built-in modules: written against the plugin API only, like any plugin.
        .target(
            name: "StarlingModules",
            dependencies: [
                "StarlingStorage", "StarlingXML", "StarlingLua", "StarlingMUC", "StarlingMAM", "StarlingPubSub",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "StarlingStorage",
            dependencies: [
                "StarlingSASL",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "StarlingSQLite",
            dependencies: [
                "StarlingStorage", "CSQLiteOptions",
                .product(name: "SQLiteNIO", package: "sqlite-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "StarlingPostgres",
            dependencies: [
                "StarlingStorage",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        // HTTP: one Hummingbird server per `type: http` listener, serving XMPP over WebSocket (RFC 7395), the
        // XEP-0156 documents and the other HTTP features by path. The server supplies the XMPP session.
        .target(
            name: "StarlingHTTP",
            dependencies: [
                "StarlingXML",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "NIOHTTPTypesHTTP1", package: "swift-nio-extras"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        // Moving accounts between servers: XEP-0227 export and import (with ejabberd's XIncludes), Prosody's
        // data folder, and the one writer they share. starlingctl uses it; the server does not.
        .target(
            name: "StarlingPortable",
            dependencies: [
                "StarlingXML", "StarlingSASL", "StarlingStorage", "StarlingModules", "StarlingLua",
                .product(name: "StarlingAPI", package: "PluginAPI"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "StarlingServer",
            dependencies: [
                "StarlingXML", "StarlingSASL", "StarlingFAST", "StarlingConfig", "StarlingStorage", "StarlingSQLite", "StarlingPostgres", "StarlingModules", "StarlingLua", "StarlingCluster", "StarlingHTTP", "StarlingS2S",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOFoundationCompat", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "starling",
            dependencies: [
                "StarlingServer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "starlingctl",
            dependencies: [
                "StarlingServer", "StarlingPortable",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "starling-bench",
            dependencies: [
                "StarlingTestClient", "StarlingSQLite", "StarlingPostgres", "StarlingServer", "StarlingConfig", "StarlingSASL", "StarlingModules", "StarlingLua",
                "StarlingStorage", .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        // The worked example of examples/README.md, compiled so it never falls behind the API.
        .target(
            name: "ExampleModules",
            dependencies: [.product(name: "StarlingAPI", package: "PluginAPI")],
            path: "examples/modules",
            swiftSettings: swiftSettings
        ),
        // Our own XMPP client: used by the integration tests and, later, the load generator.
        .target(
            name: "StarlingTestClient",
            dependencies: [
                "StarlingXML", "StarlingSASL",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "StarlingUnitTests",
            dependencies: [
                "CLuaSandbox", "StarlingXML", "StarlingSASL", "StarlingFAST", "StarlingConfig", "StarlingServer", "StarlingSQLite", "StarlingPostgres", "StarlingModules", "StarlingLua", "StarlingMUC", "StarlingMAM", "StarlingPubSub", "StarlingCluster", "StarlingHTTP", "StarlingPortable", "StarlingS2S", "ExampleModules",
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "StarlingIntegrationTests",
            dependencies: [
                "StarlingTestClient", "StarlingSASL", "StarlingXML",
                .product(name: "HummingbirdWSClient", package: "hummingbird-websocket"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "StarlingAPI", package: "PluginAPI"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
    ]
)
