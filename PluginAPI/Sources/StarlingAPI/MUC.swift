/// Multi-user chat (XEP-0045) as modules and policy hooks see it: roles, affiliations, room options,
/// and the hook points the `muc` module runs at each decision.

/// An occupant's role in a room: what it may do while it is there.
public enum MUCRole: String, Sendable, CaseIterable, Codable {
    case moderator, participant, visitor, none
}

/// A user's lasting relation to a room, by bare JID.
public enum MUCAffiliation: String, Sendable, CaseIterable, Codable {
    case owner, admin, member, none, outcast

    /// Higher ranks may act on lower ones (owner 4 … outcast 0).
    public var rank: Int {
        switch self {
        case .owner: return 4
        case .admin: return 3
        case .member: return 2
        case .none: return 1
        case .outcast: return 0
        }
    }
}

/// Who may send private messages in a room (`muc#roomconfig_allowpm`).
public enum MUCPrivateMessages: String, Sendable, CaseIterable, Codable {
    case anyone, participants, moderators, none
}

/// A room's configuration: the `muc#roomconfig` form's fields, typed.
public struct MUCRoomOptions: Sendable, Equatable, Codable {
    public var name = ""
    public var description = ""
    public var language = ""
    public var persistent = false
    /// Listed in the service's disco#items.
    public var isPublic = true
    public var membersOnly = false
    public var moderated = false
    public var passwordProtected = false
    public var password = ""
    /// Everyone sees occupants' real JIDs (`whois` = anyone); otherwise only moderators do.
    public var nonAnonymous = false
    /// At most this many occupants (the service's own limit applies too).
    public var maxOccupants = 200
    /// Participants may change the subject (moderators always may).
    public var changeSubject = false
    /// Members (not only admins) may invite others to a members-only room.
    public var allowInvites = false
    public var allowPrivateMessages = MUCPrivateMessages.anyone
    /// Roles whose presence is broadcast to the room.
    public var presenceBroadcast: [MUCRole] = [.moderator, .participant, .visitor]
    /// Roles that may read the member list.
    public var getMemberList: [MUCRole] = [.moderator, .participant, .visitor]
    /// The room is logged publicly (announced with status code 170).
    public var enableLogging = false
    /// Messages are kept in the room's archive (XEP-0313), once message archiving runs.
    public var enableArchiving = true
    /// Visitors may ask moderators for voice.
    public var allowVoiceRequests = true

    public init() {}

    private enum CodingKeys: String, CodingKey {
        case name, description, language, persistent, isPublic, membersOnly, moderated, passwordProtected, password, nonAnonymous,
             maxOccupants, changeSubject, allowInvites, allowPrivateMessages, presenceBroadcast, getMemberList, enableLogging,
             enableArchiving, allowVoiceRequests
    }

    /// Reads stored options; anything missing (options added in a later version) keeps its default.
    public init(from decoder: any Decoder) throws {
        let values = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = MUCRoomOptions()
        func read<T: Decodable>(_ key: CodingKeys, _ fallback: T) throws -> T { try values.decodeIfPresent(T.self, forKey: key) ?? fallback }
        name = try read(.name, defaults.name)
        description = try read(.description, defaults.description)
        language = try read(.language, defaults.language)
        persistent = try read(.persistent, defaults.persistent)
        isPublic = try read(.isPublic, defaults.isPublic)
        membersOnly = try read(.membersOnly, defaults.membersOnly)
        moderated = try read(.moderated, defaults.moderated)
        passwordProtected = try read(.passwordProtected, defaults.passwordProtected)
        password = try read(.password, defaults.password)
        nonAnonymous = try read(.nonAnonymous, defaults.nonAnonymous)
        maxOccupants = try read(.maxOccupants, defaults.maxOccupants)
        changeSubject = try read(.changeSubject, defaults.changeSubject)
        allowInvites = try read(.allowInvites, defaults.allowInvites)
        allowPrivateMessages = try read(.allowPrivateMessages, defaults.allowPrivateMessages)
        presenceBroadcast = try read(.presenceBroadcast, defaults.presenceBroadcast)
        getMemberList = try read(.getMemberList, defaults.getMemberList)
        enableLogging = try read(.enableLogging, defaults.enableLogging)
        enableArchiving = try read(.enableArchiving, defaults.enableArchiving)
        allowVoiceRequests = try read(.allowVoiceRequests, defaults.allowVoiceRequests)
    }
}

/// A room as policy hooks see it.
public struct MUCRoomInfo: Sendable {
    /// The room's bare JID.
    public let jid: JID
    public let options: MUCRoomOptions
    public let occupants: Int
    public let subject: String

    public init(jid: JID, options: MUCRoomOptions, occupants: Int, subject: String) {
        self.jid = jid
        self.options = options
        self.occupants = occupants
        self.subject = subject
    }
}

/// One occupant (or would-be occupant) as policy hooks see it.
public struct MUCOccupantInfo: Sendable {
    public let nick: String
    /// The real JID of the session acting.
    public let jid: JID
    public let role: MUCRole
    public let affiliation: MUCAffiliation

    public init(nick: String, jid: JID, role: MUCRole, affiliation: MUCAffiliation) {
        self.nick = nick
        self.jid = jid
        self.role = role
        self.affiliation = affiliation
    }
}

/// A room is about to be created, or destroyed by its owner. `.reject` refuses (the user gets that
/// error; `.handled` refuses with `<not-allowed/>`).
public struct MUCRoomEvent: Sendable {
    public let room: MUCRoomInfo
    /// The real JID of the user creating or destroying the room.
    public let actor: JID
    /// The creator's nickname (creation only).
    public let nick: String?
    /// How many rooms of this service the actor owns already.
    public let ownedRooms: Int

    public init(room: MUCRoomInfo, actor: JID, nick: String?, ownedRooms: Int) {
        self.room = room
        self.actor = actor
        self.nick = nick
        self.ownedRooms = ownedRooms
    }
}

/// An owner submits a configuration. Handlers may refuse it (`.reject`) or change what is applied
/// through `options`.
public struct MUCConfigureEvent: Sendable {
    /// The room as it is now.
    public let room: MUCRoomInfo
    public let actor: JID
    /// What will be applied.
    public let options: Adjustable<MUCRoomOptions>

    public init(room: MUCRoomInfo, actor: JID, options: Adjustable<MUCRoomOptions>) {
        self.room = room
        self.actor = actor
        self.options = options
    }
}

/// What an occupant joins as; join handlers may change it.
public struct MUCGrant: Sendable, Equatable {
    public var role: MUCRole
    public var affiliation: MUCAffiliation

    public init(role: MUCRole, affiliation: MUCAffiliation) {
        self.role = role
        self.affiliation = affiliation
    }
}

/// A user is about to enter a room (every other check passed). `.reject` refuses with that error;
/// changing `grant` changes the role or affiliation it enters with (an affiliation change is stored).
public struct MUCJoinEvent: Sendable {
    public let room: MUCRoomInfo
    /// The user, with the role and affiliation the room would give it.
    public let occupant: MUCOccupantInfo
    /// The join presence.
    public let stanza: XMLElement
    public let grant: Adjustable<MUCGrant>

    public init(room: MUCRoomInfo, occupant: MUCOccupantInfo, stanza: XMLElement, grant: Adjustable<MUCGrant>) {
        self.room = room
        self.occupant = occupant
        self.stanza = stanza
        self.grant = grant
    }
}

/// A groupchat message, a private message between occupants or a subject change, before the room
/// checks the sender's privileges. `.handled` drops it, `.reject` refuses it with that error, `.modify`
/// goes on with another stanza. Setting `senderRole` changes the sender's role first (for example,
/// voice for a newcomer whose wait is over); setting `kick` refuses the stanza and removes the sender
/// from the room with that reason.
public struct MUCMessageEvent: StanzaCarryingEvent {
    public let room: MUCRoomInfo
    public let sender: MUCOccupantInfo
    /// For private messages: the occupant it is for.
    public let recipient: MUCOccupantInfo?
    /// As the sender sent it (or as an earlier handler's `.modify` left it).
    public var stanza: XMLElement
    public let senderRole: Adjustable<MUCRole>
    public let kick: Adjustable<String?>

    public init(room: MUCRoomInfo, sender: MUCOccupantInfo, recipient: MUCOccupantInfo?, stanza: XMLElement,
                senderRole: Adjustable<MUCRole>, kick: Adjustable<String?>) {
        self.room = room
        self.sender = sender
        self.recipient = recipient
        self.stanza = stanza
        self.senderRole = senderRole
        self.kick = kick
    }
}

/// An occupant asks for another nickname. `.reject` refuses with that error.
public struct MUCNickChangeEvent: Sendable {
    public let room: MUCRoomInfo
    public let occupant: MUCOccupantInfo
    public let newNick: String

    public init(room: MUCRoomInfo, occupant: MUCOccupantInfo, newNick: String) {
        self.room = room
        self.occupant = occupant
        self.newNick = newNick
    }
}

/// A moderator, admin or owner changes someone's role or affiliation (a kick is the role `none`, a
/// ban the affiliation `outcast`), after the room has checked the privileges. `.reject` refuses with
/// that error (`.handled` with `<not-allowed/>`).
public struct MUCModerationEvent: Sendable {
    public enum Action: String, Sendable {
        case kick, ban, role, affiliation
    }

    public let room: MUCRoomInfo
    public let action: Action
    /// The real JID of who acts.
    public let actor: JID
    /// The target's nickname (role changes) or bare JID (affiliation changes).
    public let targetNick: String?
    public let targetJID: JID?
    public let role: MUCRole?
    public let affiliation: MUCAffiliation?
    public let reason: String?

    public init(room: MUCRoomInfo, action: Action, actor: JID, targetNick: String?, targetJID: JID?, role: MUCRole?,
                affiliation: MUCAffiliation?, reason: String?) {
        self.room = room
        self.action = action
        self.actor = actor
        self.targetNick = targetNick
        self.targetJID = targetJID
        self.role = role
        self.affiliation = affiliation
        self.reason = reason
    }
}

extension HookPoint where Event == MUCRoomEvent {
    public static let mucRoomCreate = HookPoint("muc-room-create")
    public static let mucRoomDestroy = HookPoint("muc-room-destroy")
}

extension HookPoint where Event == MUCConfigureEvent {
    public static let mucRoomConfigure = HookPoint("muc-room-configure")
}

extension HookPoint where Event == MUCJoinEvent {
    public static let mucJoin = HookPoint("muc-join")
}

extension HookPoint where Event == MUCMessageEvent {
    public static let mucGroupchatMessage = HookPoint("muc-groupchat-message")
    public static let mucPrivateMessage = HookPoint("muc-private-message")
    public static let mucSubjectChange = HookPoint("muc-subject-change")
}

extension HookPoint where Event == MUCNickChangeEvent {
    public static let mucNickChange = HookPoint("muc-nick-change")
}

extension HookPoint where Event == MUCModerationEvent {
    public static let mucModeration = HookPoint("muc-moderation")
}
