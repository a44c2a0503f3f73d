// swift-tools-version:6.0
// The plugin API lives in its own package so that it can be a dynamic library: the server and every
// plugin then share one loaded copy of its types (a target of the server's own package would be linked
// statically into the executable and a plugin would get a second copy; casts across the boundary fail).
import PackageDescription

let package = Package(
    name: "starling-plugin-api",
    products: [
        .library(name: "StarlingAPI", type: .dynamic, targets: ["StarlingAPI"]),
    ],
    targets: [
        .target(name: "StarlingAPI"),
    ]
)
