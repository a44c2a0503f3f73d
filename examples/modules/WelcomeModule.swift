import StarlingAPI

/// A worked example of a Starling module: it greets each account once per session with a message,
/// answers a custom IQ, and shows the four things a module can declare (options, a disco feature,
/// an IQ handler, a hook). See examples/README.md for the walk-through.
public final class WelcomeModule: ServerModule {
    public static let namespace = "urn:example:welcome"

    public static let descriptor = ModuleDescriptor(
        name: "welcome",
        summary: "Greets users when they come online.",
        options: [
            ModuleOptionSpec("text", .string(choices: nil), default: .string("Welcome to Starling!"), doc: "The greeting."),
        ]
    )

    private let host: any ModuleHost
    private let text: String

    public init(host: any ModuleHost) {
        self.host = host
        text = host.options.string("text")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace)
        let text = self.text
        registrar.iq(.get, "greeting", Self.namespace) { _ in
            .result(XMLElement(name: "greeting", namespace: Self.namespace).with(text: text))
        }
        registrar.hook(.initialPresence, priority: 0) { [host] event in
            var message = XMLElement(name: "message", namespace: Namespace.client, attributes: [
                "from": host.domain, "to": event.jid.description, "type": "headline",
            ])
            message.append(XMLElement(name: "body", namespace: Namespace.client).with(text: text))
            host.route(message)
            return .pass
        }
    }
}
