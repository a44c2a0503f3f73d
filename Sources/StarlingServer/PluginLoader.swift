import Foundation
import StarlingAPI
import Synchronization

/// Why a plugin was not loaded.
public struct PluginError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// Loads modules from plugin shared libraries (built from `plugins/`).
///
/// Each load copies the library to a fresh path first, because `dlopen` of a path it already opened
/// returns the old image: that is what lets `reload-module` pick up a new build. Images are **never
/// unloaded** (`dlclose`): the Swift runtime keeps pointers into every image it has seen (protocol
/// conformance caches), and unloading one crashes the server later. Each reload therefore keeps its
/// mapping; `loadedImages` counts them and `starlingctl status` shows the count.
public enum PluginLoader {
    private static let images = Atomic<Int>(0)
    private static let copies = Atomic<Int>(0)

    /// Plugin images mapped into this process since start.
    public static var loadedImages: Int { images.load(ordering: .relaxed) }

    /// Loads the plugin at `path` and returns its module type. The copy that is actually opened goes to
    /// `copyDirectory` and is removed once mapped.
    public static func load(path: String, copyDirectory: String = FileManager.default.temporaryDirectory.appendingPathComponent("starling-plugins-\(getpid())").path) throws(PluginError) -> any ServerModule.Type {
        guard FileManager.default.fileExists(atPath: path) else {
            throw PluginError("\(path): no such file (build the plugin first: swift build --package-path plugins/<name>)")
        }
        let copy = URL(fileURLWithPath: copyDirectory)
            .appendingPathComponent("\(copies.add(1, ordering: .relaxed).newValue)-\(URL(fileURLWithPath: path).lastPathComponent)").path
        do {
            try FileManager.default.createDirectory(atPath: copyDirectory, withIntermediateDirectories: true)
            try? FileManager.default.removeItem(atPath: copy)
            try FileManager.default.copyItem(atPath: path, toPath: copy)
        } catch {
            throw PluginError("\(path): cannot copy it to \(copy): \(error.localizedDescription)")
        }
        let opened = dlopen(copy, RTLD_NOW | RTLD_LOCAL)
        // The mapping outlives the file.
        try? FileManager.default.removeItem(atPath: copy)
        guard let handle = opened else {
            throw PluginError("\(path): cannot load: \(dlerror().map { String(cString: $0) } ?? "unknown dlopen error")")
        }
        images.add(1, ordering: .relaxed)
        // The handle is deliberately never closed (see above).
        guard let versionSymbol = dlsym(handle, "starling_plugin_api_version") else {
            throw PluginError("\(path): not a Starling plugin (it exports no starling_plugin_api_version)")
        }
        typealias VersionFunction = @convention(c) () -> Int
        let version = unsafeBitCast(versionSymbol, to: VersionFunction.self)()
        guard version == StarlingAPIVersion.api else {
            throw PluginError("\(path): built against plugin API version \(version), but this server provides version \(StarlingAPIVersion.api); rebuild the plugin against this server's PluginAPI")
        }
        guard let moduleSymbol = dlsym(handle, "starling_plugin_module") else {
            throw PluginError("\(path): it exports no starling_plugin_module")
        }
        typealias ModuleFunction = @convention(c) () -> UnsafeMutableRawPointer
        let plugin = StarlingPlugin.take(unsafeBitCast(moduleSymbol, to: ModuleFunction.self)())
        return plugin.module
    }
}

/// The plugin modules loaded while reading the configuration, by module name.
public final class LoadedPlugins: @unchecked Sendable {
    public private(set) var modules: [String: any ServerModule.Type] = [:]

    public init() {}

    /// For `StarlingConfiguration.load(loadPlugin:)`.
    public func load(name: String, path: String) throws -> ModuleDescriptor {
        let module = try PluginLoader.load(path: path)
        modules[name] = module
        return module.descriptor
    }
}
