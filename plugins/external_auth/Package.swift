// swift-tools-version:6.0
// A Starling plugin: builds libExternalAuth.so, which the server loads from `plugins:` in its config.
// It must be built with the same toolchain and the same PluginAPI source as the server (Swift has no
// stable ABI on Linux); the server refuses a plugin built against another plugin API version.
import PackageDescription

// STARLING_PLUGIN_API points at another copy of PluginAPI (the tests build against a changed one).
let pluginAPI = Context.environment["STARLING_PLUGIN_API"] ?? "../../PluginAPI"

let package = Package(
    name: "external-auth",
    products: [
        .library(name: "ExternalAuth", type: .dynamic, targets: ["ExternalAuth"]),
    ],
    dependencies: [
        .package(path: pluginAPI),
    ],
    targets: [
        .target(name: "ExternalAuth", dependencies: [.product(name: "StarlingAPI", package: "PluginAPI")]),
    ]
)
