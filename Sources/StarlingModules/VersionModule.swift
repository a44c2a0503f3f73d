import Foundation
import StarlingAPI

/// XEP-0092: the server's software name and version (and, if allowed, its operating system).
public final class VersionModule: ServerModule {
    public static let namespace = "jabber:iq:version"
    public static let descriptor = ModuleDescriptor(
        name: "version", summary: "Tells clients which server software this is.", xeps: ["XEP-0092"],
        options: [
            ModuleOptionSpec("show_os", .boolean, default: .boolean(false), doc: "Include the operating system (off: it helps attackers more than users)."),
        ]
    )

    private let showOS: Bool

    public init(host: any ModuleHost) {
        showOS = host.options.boolean("show_os")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace)
        let showOS = self.showOS
        registrar.iq(.get, "query", Self.namespace, fromRemote: true) { _ in
            var query = XMLElement(name: "query", namespace: Self.namespace)
            query.append(XMLElement(name: "name", namespace: Self.namespace).with(text: "Starling"))
            query.append(XMLElement(name: "version", namespace: Self.namespace).with(text: StarlingAPIVersion.serverVersion))
            if showOS {
                let os = ProcessInfo.processInfo.operatingSystemVersionString
                query.append(XMLElement(name: "os", namespace: Self.namespace).with(text: os))
            }
            return .result(query)
        }
    }
}
