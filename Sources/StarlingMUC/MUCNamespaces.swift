import Foundation
import StarlingAPI

/// The namespaces a MUC service speaks.
enum MUCNamespace {
    static let muc = "http://jabber.org/protocol/muc"
    static let user = "http://jabber.org/protocol/muc#user"
    static let admin = "http://jabber.org/protocol/muc#admin"
    static let owner = "http://jabber.org/protocol/muc#owner"
    static let roomConfig = "http://jabber.org/protocol/muc#roomconfig"
    static let roomInfo = "http://jabber.org/protocol/muc#roominfo"
    static let request = "http://jabber.org/protocol/muc#request"
    static let register = "http://jabber.org/protocol/muc#register"
    static let stableID = "http://jabber.org/protocol/muc#stable_id"
    static let selfPing = "http://jabber.org/protocol/muc#self-ping-optimization"
    static let discoInfo = "http://jabber.org/protocol/disco#info"
    static let discoItems = "http://jabber.org/protocol/disco#items"
    static let stanzaID = "urn:xmpp:sid:0"
    static let occupantID = "urn:xmpp:occupant-id:0"
    static let delay = "urn:xmpp:delay"
    static let iqRegister = "jabber:iq:register"
    static let directInvitation = "jabber:x:conference"
}
