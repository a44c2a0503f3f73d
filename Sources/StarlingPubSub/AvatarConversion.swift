import Foundation
import StarlingAPI
import StarlingStorage
import StarlingXML

/// XEP-0398: an avatar published through PEP (XEP-0084) becomes the account's vCard photo, so clients
/// that only know XEP-0153 see it too.
public struct AvatarConversion: Sendable {
    public static let feature = "urn:xmpp:pep-vcard-conversion:0"
    static let metadataNode = "urn:xmpp:avatar:metadata"
    static let dataNode = "urn:xmpp:avatar:data"
    /// Fired when the vCard photo changed this way, so the module that puts the photo's hash into
    /// presence (XEP-0153) uses the new one from the next presence on.
    public static let changed = HookPoint<AvatarChangedEvent>("vcard-avatar-changed")

    let vcards: any VCardStore
    let host: any ModuleHost

    /// After a publication to the metadata node: copies the image it points at into the vCard, or takes
    /// the photo out when the metadata is empty (the avatar was removed). Only avatars whose data node is
    /// open are copied: a vCard can be read by anyone.
    func published(_ item: StoredPubSubItem, owner: JID, engine: PubSubEngine) async {
        guard let metadata = XMLFragmentParser.parse(item.payload, defaultNamespace: ""), metadata.name == "metadata" else { return }
        do {
            let photo: (type: String, data: String, hash: String)?
            if let info = metadata.elements.first(where: { $0.name == "info" && $0[attribute: "url"] == nil }), let id = info[attribute: "id"] {
                guard try await engine.nodes(of: owner)[Self.dataNode]?.config.accessModel == "open",
                      let stored = try await engine.item(id, of: Self.dataNode, service: owner),
                      let data = XMLFragmentParser.parse(stored.payload, defaultNamespace: "")?.text.filter({ !$0.isWhitespace }), !data.isEmpty
                else { return }
                photo = (info[attribute: "type"] ?? "image/png", data, id.lowercased())
            } else {
                photo = nil
            }
            var vCard = try await vcards.vCard(of: owner).flatMap { XMLFragmentParser.parse($0.xml, defaultNamespace: "") }
                ?? XMLElement(name: "vCard", namespace: "vcard-temp")
            vCard.removeChildren("PHOTO", namespace: "vcard-temp")
            if let photo {
                var element = XMLElement(name: "PHOTO", namespace: "vcard-temp")
                element.append(XMLElement(name: "TYPE", namespace: "vcard-temp").with(text: photo.type))
                element.append(XMLElement(name: "BINVAL", namespace: "vcard-temp").with(text: photo.data))
                vCard.append(element)
            }
            try await vcards.setVCard(vCard.serialized(), photoHash: photo?.hash, of: owner)
            _ = host.run(Self.changed, AvatarChangedEvent(user: owner, photoHash: photo?.hash))
        } catch {
            host.log(.warning, "XEP-0398: the avatar of \(owner) could not be copied into its vCard: \(error)")
        }
    }
}

/// An account's vCard photo changed (see `AvatarConversion.changed`).
public struct AvatarChangedEvent: Sendable {
    /// The account's bare JID.
    public let user: JID
    /// The SHA-1 of the new photo (hex), or nil when it has none now.
    public let photoHash: String?
}
