import ExampleModules
import StarlingAPI
import StarlingConfig
import StarlingModules
import Synchronization
import XCTest

/// The worked example of examples/README.md does what the README says.
final class ExampleModuleTests: XCTestCase {
    /// Records what the module routes; everything else a host does is irrelevant to this module.
    final class RecordingHost: QuietModuleHost, Sendable {
        let domain = "example.org"
        let options: ModuleOptions
        let routed = Mutex<[XMLElement]>([])
        init(options: ModuleOptions) { self.options = options }
        func route(_ stanza: XMLElement) { routed.withLock { $0.append(stanza) } }
    }

    func testOptionsAreValidatedAndTheModuleRegistersWhatItDeclares() async throws {
        let catalog = BuiltinModules.descriptors + [WelcomeModule.descriptor]
        let configuration = try StarlingConfiguration.parse(yaml: "modules:\n  welcome:\n    text: Hello there\n", file: "t.yml", moduleCatalog: catalog)
        XCTAssertThrowsError(try StarlingConfiguration.parse(yaml: "modules:\n  welcome:\n    txt: typo\n", file: "t.yml", moduleCatalog: catalog))
        let host = RecordingHost(options: configuration.modules[0].options)
        let module = WelcomeModule(host: host)
        let registrar = ModuleRegistrar(module: "welcome")
        module.register(registrar)
        XCTAssertEqual(registrar.features.map(\.namespace), [WelcomeModule.namespace])

        let handler = try XCTUnwrap(registrar.iqHandlers.first { $0.key.name == "greeting" }).handler
        let request = IQRequest(stanza: XMLElement(name: "iq", namespace: Namespace.client, children: [.element(XMLElement(name: "greeting", namespace: WelcomeModule.namespace))]),
                                from: JID("a@example.org/r")!, to: JID("example.org")!)
        guard case .result(let payload) = try await handler(request) else { return XCTFail() }
        XCTAssertEqual(payload?.text, "Hello there")

        let hook = try XCTUnwrap(registrar.hooks.first { $0.name == HookPoint<SessionEvent>.initialPresence.name })
        XCTAssertEqual(hook.call(SessionEvent(jid: JID("a@example.org/r")!)), .pass)
        let greeting = try XCTUnwrap(host.routed.withLock { $0.first })
        XCTAssertEqual(greeting[attribute: "to"], "a@example.org/r")
        XCTAssertEqual(greeting.child("body")?.text, "Hello there")
    }
}
