import Crypto
import Foundation
import StarlingAPI
import StarlingPubSub
import StarlingStorage
import Synchronization

/// XEP-0054 vcard-temp, and XEP-0153: the SHA-1 of the account's photo is added to its available
/// presence when the client did not say it, so contacts know when to fetch a new avatar.
public final class VCardModule: ServerModule {
    public static let namespace = "vcard-temp"
    public static let updateNamespace = "vcard-temp:x:update"
    public static let descriptor = ModuleDescriptor(
        name: "vcard", summary: "vCards and avatar hashes in presence.", xeps: ["XEP-0054", "XEP-0153"],
        options: [ModuleOptionSpec("max_size", .integer(1024...16_777_216), default: .integer(131_072), doc: "Largest vCard in bytes.")]
    )

    private let store: any VCardStore
    private let maxSize: Int
    /// Photo hashes of accounts with a session ("" = no photo), kept for the presence path.
    private let hashes = Mutex<[JID: String]>([:])
    private let host: any ModuleHost

    public init(host: any ModuleHost) throws {
        self.host = host
        store = try host.require((any VCardStore).self, "vCard storage")
        maxSize = host.options.integer("max_size")
    }

    public func register(_ registrar: ModuleRegistrar) {
        registrar.feature(Self.namespace, for: .both)
        registrar.iq(.get, "vCard", Self.namespace, target: .account, fromRemote: true) { [store] request in
            // Anyone may read a vCard; unknown or empty accounts answer with an empty one.
            if let stored = try await store.vCard(of: request.to), let element = StoredXML.parse(stored.xml) {
                return .result(element)
            }
            return .result(XMLElement(name: "vCard", namespace: Self.namespace))
        }
        registrar.iq(.set, "vCard", Self.namespace, target: .account) { [self] request in
            guard request.from.bare == request.to else { return .error(.forbidden) }
            let text = request.payload.serialized()
            guard text.utf8.count <= maxSize else { return .error(.notAcceptable, text: "the vCard is larger than \(maxSize) bytes") }
            let hash = Self.photoHash(request.payload)
            try await store.setVCard(text, photoHash: hash, of: request.to)
            hashes.withLock { $0[request.to] = hash ?? "" }
            return .result(nil)
        }
        // Read when a session binds here, or arrives resumed from another node.
        let loadHash: @Sendable (JID) -> Void = { [self] session in
            let user = session.bare
            Task {
                let hash = (try? await store.vCard(of: user))??.photoHash
                hashes.withLock { $0[user] = hash ?? "" }
            }
        }
        registrar.hook(.sessionBound) { event in
            loadHash(event.jid)
            return .pass
        }
        registrar.hook(.sessionArrived) { event in
            loadHash(event.jid)
            return .pass
        }
        // XEP-0398: a PEP avatar became the vCard photo.
        registrar.hook(AvatarConversion.changed) { [self] event in
            hashes.withLock { if $0[event.user] != nil { $0[event.user] = event.photoHash ?? "" } }
            return .pass
        }
        // What is kept per session here goes when it ends, or when it moves to another node of the cluster.
        let forgetSession: @Sendable (SessionEvent) -> HookResult = { [self] event in
            if !host.resources(of: event.jid.bare).contains(where: \.isLocal) { hashes.withLock { _ = $0.removeValue(forKey: event.jid.bare) } }
            return .pass
        }
        registrar.hook(.sessionClosed, forgetSession)
        registrar.hook(.sessionMoved, forgetSession)
        // Runs before the presence module broadcasts (priority 100).
        registrar.hook(.stanzaFromClient, priority: 200) { [self] event in
            let stanza = event.stanza
            guard stanza.name == "presence", stanza[attribute: "type"] == nil, stanza[attribute: "to"] == nil,
                  let origin = event.origin, stanza.child("x", namespace: Self.updateNamespace) == nil,
                  let hash = hashes.withLock({ $0[origin.bare] })
            else { return .pass }
            var modified = stanza
            var update = XMLElement(name: "x", namespace: Self.updateNamespace)
            update.append(hash.isEmpty ? XMLElement(name: "photo", namespace: Self.updateNamespace)
                                       : XMLElement(name: "photo", namespace: Self.updateNamespace).with(text: hash))
            modified.append(update)
            return .modify(modified)
        }
    }

    /// SHA-1 (hex) of the decoded PHOTO/BINVAL, or nil without a photo.
    public static func photoHash(_ vCard: XMLElement) -> String? {
        guard let binval = vCard.child("PHOTO")?.child("BINVAL")?.text.filter({ !$0.isWhitespace }), !binval.isEmpty,
              let data = Data(base64Encoded: binval)
        else { return nil }
        return Insecure.SHA1.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }
}
