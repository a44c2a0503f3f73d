import StarlingAPI

/// XEP-0198 stream management: acknowledgements both ways, and resumption of a session whose
/// connection dropped (a phone changing networks) within `resume_timeout`, with everything it was not
/// confirmed to have received sent again. The counting and the detached sessions live in the core's
/// c2s streams; this module switches them on for its host and holds their options.
public final class StreamManagementModule: ServerModule {
    public static let namespace = "urn:xmpp:sm:3"
    public static let descriptor = ModuleDescriptor(
        name: "stream_management", summary: "Acknowledged delivery and session resumption for clients on flaky networks.", xeps: ["XEP-0198"],
        options: [
            ModuleOptionSpec("resume_timeout", .integer(0...86_400), default: .integer(300),
                             doc: "Seconds a session whose connection dropped waits to be resumed (0: no resumption); then the messages it was not confirmed to have received go to offline storage."),
            ModuleOptionSpec("max_queue", .integer(10...1_000_000), default: .integer(1_000),
                             doc: "Stanzas a session may hold unacknowledged (and a detached session may collect) before its stream ends."),
        ]
    )

    public init(host: any ModuleHost) {}

    public func register(_ registrar: ModuleRegistrar) {
        registrar.streamFeature(XMLElement(name: "sm", namespace: Self.namespace), phase: .afterAuthentication)
    }
}
