import Foundation
import StarlingAPI

/// XEP-0202: the server's time, in UTC (XEP-0082 format).
public final class TimeModule: ServerModule {
    public static let namespace = "urn:xmpp:time"
    public static let descriptor = ModuleDescriptor(name: "time", summary: "Tells clients the server's time.", xeps: ["XEP-0202"])

    public init(host: any ModuleHost) {}

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace)
        registrar.iq(.get, "time", Self.namespace, fromRemote: true) { _ in
            var time = XMLElement(name: "time", namespace: Self.namespace)
            time.append(XMLElement(name: "tzo", namespace: Self.namespace).with(text: "+00:00"))
            time.append(XMLElement(name: "utc", namespace: Self.namespace).with(text: Self.utcNow()))
            return .result(time)
        }
    }

    static func utcNow() -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        formatter.timeZone = TimeZone(identifier: "UTC")
        return formatter.string(from: Date())
    }
}
