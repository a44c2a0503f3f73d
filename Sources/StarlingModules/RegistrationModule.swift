import Foundation
import StarlingAPI
import StarlingStorage
import Synchronization

/// XEP-0077: account creation on the stream before authentication (off unless enabled, and rate
/// limited per IP address), password change and account removal once authenticated.
public final class RegistrationModule: ServerModule {
    public static let namespace = "jabber:iq:register"
    public static let descriptor = ModuleDescriptor(
        name: "register", summary: "In-band registration.", xeps: ["XEP-0077"],
        options: [
            ModuleOptionSpec("allow_registration", .boolean, default: .boolean(false), doc: "Let anyone create an account from their client."),
            ModuleOptionSpec("access", .accessRule, default: .string("all"), doc: "Who may register in-band, by the new account and the client's address (with allow_registration)."),
            ModuleOptionSpec("min_interval", .number(0...86400), default: .number(60), doc: "Seconds between two registrations from one IP address."),
            ModuleOptionSpec("min_password_length", .integer(1...1024), default: .integer(8), doc: "Shortest password accepted."),
            ModuleOptionSpec("scram_iterations", .integer(4096...1_000_000), default: .integer(4096), doc: "PBKDF2 iterations for the stored keys."),
        ]
    )

    private let host: any ModuleHost
    private let accounts: any AccountStore
    private let allowRegistration: Bool
    private let access: String
    private let minInterval: Double
    private let minPasswordLength: Int
    private let iterations: Int
    private let lastRegistration = Mutex<[String: Date]>([:])

    public init(host: any ModuleHost) throws {
        self.host = host
        accounts = try host.require((any AccountStore).self, "account storage")
        allowRegistration = host.options.boolean("allow_registration")
        access = host.options.string("access")
        minInterval = host.options.number("min_interval")
        minPasswordLength = host.options.integer("min_password_length")
        iterations = host.options.integer("scram_iterations")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .both)
        if allowRegistration {
            registrar.streamFeature(XMLElement(name: "register", namespace: "http://jabber.org/features/iq-register"), phase: .beforeAuthentication)
            registrar.hook(.preAuthIQ) { [self] event in
                guard event.stanza.child("query", namespace: Self.namespace) != nil else { return .pass }
                Task { event.reply(await self.handlePreAuth(event)) }
                return .handled
            }
        }
        registrar.iq(.get, "query", Self.namespace, target: .both) { request in
            var query = XMLElement(name: "query", namespace: Self.namespace)
            query.append(XMLElement(name: "registered", namespace: Self.namespace))
            query.append(XMLElement(name: "username", namespace: Self.namespace).with(text: request.from.localpart ?? ""))
            return .result(query)
        }
        registrar.iq(.set, "query", Self.namespace, target: .both) { [self] request in
            let user = request.from.bare
            if request.payload.child("remove", namespace: Self.namespace) != nil {
                try await accounts.deleteAccount(username: user.localpart!, host: user.domainpart)
                host.log(.info, "\(user) removed their account")
                // XEP-0077 §3.2: the result first, then the account's streams end.
                let host = self.host
                Task {
                    try? await Task.sleep(for: .milliseconds(200))
                    host.closeSessions(of: user)
                }
                return .result(nil)
            }
            guard let username = request.payload.child("username")?.text, let password = request.payload.child("password")?.text else {
                return .error(.badRequest, text: "username and password are required")
            }
            guard (try? JID(localpart: username, domainpart: user.domainpart))?.localpart == user.localpart else {
                return .error(.notAllowed, text: "you can only change your own password")
            }
            guard password.count >= minPasswordLength else { return .error(.notAcceptable, text: "the password is too short") }
            try await accounts.changePassword(username: user.localpart!, host: user.domainpart, password: password, iterations: iterations)
            return .result(nil)
        }
    }

    private func handlePreAuth(_ event: PreAuthIQEvent) async -> XMLElement {
        let iq = event.stanza
        switch iq[attribute: "type"] {
        case "get":
            var query = XMLElement(name: "query", namespace: Self.namespace)
            query.append(XMLElement(name: "instructions", namespace: Self.namespace).with(text: "Choose a username and password."))
            query.append(XMLElement(name: "username", namespace: Self.namespace))
            query.append(XMLElement(name: "password", namespace: Self.namespace))
            return iq.iqResult(payload: query)
        case "set":
            guard let query = iq.child("query", namespace: Self.namespace),
                  let username = query.child("username")?.text, let password = query.child("password")?.text else {
                return iq.errorReply(.notAcceptable, text: "username and password are required")
            }
            guard let jid = try? JID(localpart: username, domainpart: event.domain) else {
                return iq.errorReply(.jidMalformed, text: "that username is not allowed")
            }
            guard host.allows(access, user: jid, address: event.address) else {
                host.log(.info, "in-band registration of \(jid) from \(event.address) refused by the access rule '\(access)'")
                return iq.errorReply(.forbidden, text: "registration is not allowed from here")
            }
            guard password.count >= minPasswordLength else {
                return iq.errorReply(.notAcceptable, text: "the password must have at least \(minPasswordLength) characters")
            }
            let now = Date()
            let minInterval = self.minInterval
            let allowed = lastRegistration.withLock { last -> Bool in
                if last.count > 100_000 { last = last.filter { now.timeIntervalSince($0.value) < minInterval } }
                guard let previous = last[event.address] else { return true }
                return now.timeIntervalSince(previous) >= minInterval
            }
            guard allowed else { return iq.errorReply(.resourceConstraint, text: "too many registrations from your address; try again later") }
            do {
                try await accounts.register(username: jid.localpart!, host: jid.domainpart, password: password, iterations: iterations)
                // Only accounts actually created count against the address.
                lastRegistration.withLock { $0[event.address] = now }
            } catch StorageError.accountExists {
                return iq.errorReply(.conflict, text: "that username is taken")
            } catch {
                host.log(.error, "registration of \(jid) failed: \(error)")
                return iq.errorReply(.internalServerError)
            }
            host.log(.info, "\(jid) registered in-band from \(event.address)")
            _ = host.run(.userRegistered, SessionEvent(jid: jid.bare))
            return iq.iqResult()
        default:
            return iq.errorReply(.badRequest)
        }
    }
}
