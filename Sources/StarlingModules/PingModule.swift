import StarlingAPI

/// XEP-0199: answers pings to the server and to accounts.
public final class PingModule: ServerModule {
    public static let descriptor = ModuleDescriptor(name: "ping", summary: "Answers XMPP pings.", xeps: ["XEP-0199"])

    public init(host: any ModuleHost) {}

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Namespace.ping, for: .both)
        registrar.iq(.get, "ping", Namespace.ping, target: .both, fromRemote: true) { _ in .result() }
    }
}
