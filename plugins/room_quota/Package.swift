// swift-tools-version:6.0
// A Starling plugin: builds libRoomQuota.so, which the server loads from `plugins:` in its config.
// It must be built with the same toolchain and the same PluginAPI source as the server (Swift has no
// stable ABI on Linux); the server refuses a plugin built against another plugin API version.
import PackageDescription

// STARLING_PLUGIN_API points at another copy of PluginAPI (the tests build against a changed one).
let pluginAPI = Context.environment["STARLING_PLUGIN_API"] ?? "../../PluginAPI"

let package = Package(
    name: "room-quota",
    products: [
        .library(name: "RoomQuota", type: .dynamic, targets: ["RoomQuota"]),
    ],
    dependencies: [
        .package(path: pluginAPI),
    ],
    targets: [
        .target(name: "RoomQuota", dependencies: [.product(name: "StarlingAPI", package: "PluginAPI")]),
    ]
)
