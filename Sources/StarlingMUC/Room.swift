import Crypto
import Foundation
import StarlingAPI
import StarlingMAM
import StarlingStorage

/// Runs policy hooks: the module's host in the server, a recorder in tests.
protocol HookRunner: Sendable {
    func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult
}

/// What a room asks its service to do: a room never routes or stores anything itself.
enum RoomAction {
    /// A stanza to route, fully addressed.
    case send(XMLElement)
    /// One stanza for many sessions (each gets it addressed to itself), serialized once.
    case broadcast(XMLElement, [JID])
    /// A change to the room's stored state; writes run in order, after the room's earlier ones.
    case store(RoomWrite)
    /// A session became an occupant, or stopped being one (for the service's per-session index).
    case joined(JID)
    case left(JID)
    /// The room's owners changed (for the per-owner room count).
    case owners(Set<JID>)
    /// The room no longer exists (destroyed, or a temporary room whose last occupant left).
    case closed
    /// A message for the room's archive, sent by `sender` (a real full JID).
    case archive(ArchivedMessage, sender: JID)
    /// A MAM request (query, form or metadata) the requester may make: `realJIDs` when it may see who
    /// sent what.
    case archiveRequest(ComponentStanza, realJIDs: Bool)
}

enum RoomWrite: Equatable {
    /// The room's configuration, subject and every affiliation.
    case all(StoredMUCRoom)
    /// The configuration and subject only.
    case options(StoredMUCRoom)
    case affiliation(JID, MUCAffiliationRecord)
    case delete
}

/// The limits and settings a room takes from its service.
struct RoomSettings: Sendable {
    var maxOccupants = 200
    var historySize = 20
    var maxNickLength = 64
    var maxSubjectLength = 1024
    /// Messages (and presence changes) per second per occupant, and the burst allowed.
    var messageRate = 5.0
    var messageBurst = 10.0
    /// Users who own every room of the service.
    var serviceAdmins: Set<JID> = []
    /// Pending IQs forwarded between occupants, per room.
    var maxForwardedIQs = 256
    /// Persistent rooms whose configuration enables it keep an archive (XEP-0313).
    var archiving = false
}

/// One occupant: a nickname held by one user, from one or more of its sessions.
struct Occupant {
    var nick: String
    /// The user's bare JID.
    let user: JID
    /// Each session's last presence, as sent to the room.
    var sessions: [JID: XMLElement]
    /// The session whose presence the room shows (the last to change it).
    var primary: JID
    var role: MUCRole
    /// Join order, for the order of the occupant list.
    var sequence: Int
    /// XEP-0421's id for this user in this room (computed once: it is a keyed hash).
    let occupantID: String
    var tokens: Double
    var refilled: Double
}

/// A discussion-history entry.
struct HistoryEntry {
    /// The message as reflected, without `to`.
    var stanza: XMLElement
    var time: Double

    /// Characters of the stanza as a newcomer gets it (for `maxchars`): measured only when asked.
    var size: Int { stanza.serialized(inheritedNamespace: Namespace.client).utf8.count + 100 }
}

/// One room (XEP-0045): occupants, affiliations, configuration, history and subject, and every rule
/// about them. Inputs are stanzas addressed to the room or its occupants; outputs are `RoomAction`s
/// for the service to carry out. Not thread-safe: the service runs one input at a time per room.
final class Room {
    let jid: JID
    var settings: RoomSettings
    var hooks: any HookRunner
    var options: MUCRoomOptions
    /// A new room waits for its owner's configuration (XEP-0045 §10.1); only owners may enter.
    var locked: Bool
    var affiliations: [JID: MUCAffiliationRecord]
    var occupants: [String: Occupant] = [:]
    /// Session (real full JID) → nickname.
    var sessions: [JID: String] = [:] {
        didSet { everySession = nil }
    }
    /// Every occupant's every session, kept between membership changes (each message goes to all).
    private var everySession: [JID]?

    var allSessions: [JID] {
        if let everySession { return everySession }
        let all = Array(sessions.keys)
        everySession = all
        return all
    }
    var history: [HistoryEntry] = []
    private(set) var subject = ""
    var subjectNick: String?
    var subjectTime: Double?
    var sequence = 0
    /// For XEP-0421 occupant ids: stable per room and user, revealing neither.
    let salt: String
    /// IQs forwarded to an occupant: our id → who asked, with which id, of whom.
    var forwardedIQs: [String: (requester: JID, id: String, target: String)] = [:]
    var forwardedOrder: [String] = []
    /// The creator's first join gets status 201.
    var justCreated = false
    var output: [RoomAction] = []

    init(jid: JID, options: MUCRoomOptions, settings: RoomSettings, hooks: any HookRunner, affiliations: [JID: MUCAffiliationRecord] = [:],
         locked: Bool = false, salt: String = StanzaID.next()) {
        self.jid = jid
        self.options = options
        self.settings = settings
        self.hooks = hooks
        self.affiliations = affiliations
        self.locked = locked
        self.salt = salt
    }

    /// A room as stored (a persistent room loaded at start).
    convenience init(stored: StoredMUCRoom, settings: RoomSettings, hooks: any HookRunner) {
        self.init(jid: stored.jid, options: stored.options, settings: settings, hooks: hooks, affiliations: stored.affiliations, salt: stored.salt)
        subject = stored.subject
        subjectNick = stored.subjectNick
        subjectTime = stored.subjectTime.map(Double.init)
    }

    /// A new room: `creator` becomes its owner, and its first join is announced with status 201.
    static func created(jid: JID, creator: JID, options: MUCRoomOptions, settings: RoomSettings, hooks: any HookRunner, locked: Bool) -> Room {
        let room = Room(jid: jid, options: options, settings: settings, hooks: hooks,
                        affiliations: [creator.bare: MUCAffiliationRecord(affiliation: .owner)], locked: locked)
        room.justCreated = true
        return room
    }

    var isEmpty: Bool { occupants.isEmpty }
    var info: MUCRoomInfo { MUCRoomInfo(jid: jid, options: options, occupants: occupants.count, subject: subject) }
    var owners: Set<JID> { Set(affiliations.filter { $0.value.affiliation == .owner }.keys) }

    var stored: StoredMUCRoom {
        StoredMUCRoom(jid: jid, options: options, subject: subject, subjectNick: subjectNick, subjectTime: subjectTime.map { Int($0) },
                      salt: salt, affiliations: affiliations)
    }

    // MARK: Inputs

    /// A stanza for the room (`to` is the room) or one of its occupants (`to` has a nickname).
    func handle(_ input: ComponentStanza, now: Double) -> [RoomAction] {
        output = []
        switch input.stanza.name {
        case "presence": presence(input, now: now)
        case "message": message(input, now: now)
        case "iq": iq(input, now: now)
        default: break
        }
        return takeOutput()
    }

    /// A session went away without leaving: it leaves every room it was in.
    func sessionClosed(_ session: JID) -> [RoomAction] {
        output = []
        if let nick = sessions[session] { leave(session: session, nick: nick, status: nil) }
        return takeOutput()
    }

    /// The service is stopping: every occupant is told with status 332 (XEP-0045 §11.2).
    func shutdown() -> [RoomAction] {
        output = []
        for occupant in sortedOccupants() {
            for session in occupant.sessions.keys {
                var presence = unavailable(from: occupant, to: session)
                presence.append(userX(item: item(for: occupant, role: MUCRole.none, jidVisible: true), statuses: [110, 332]))
                send(presence)
                output.append(.left(session))
            }
        }
        occupants = [:]
        sessions = [:]
        return takeOutput()
    }

    func takeOutput() -> [RoomAction] {
        defer { output = [] }
        return output
    }

    func send(_ stanza: XMLElement) { output.append(.send(stanza)) }

    // MARK: Affiliations and roles

    /// The user's affiliation: service admins own every room; a domain's ban covers its users.
    func affiliation(of user: JID) -> MUCAffiliation {
        let bare = user.bare
        if settings.serviceAdmins.contains(bare) { return .owner }
        if let record = affiliations[bare] { return record.affiliation }
        if bare.localpart != nil, affiliations[bare.domain]?.affiliation == .outcast { return .outcast }
        return .none
    }

    func defaultRole(for affiliation: MUCAffiliation) -> MUCRole {
        switch affiliation {
        case .owner, .admin: return .moderator
        case .member: return .participant
        case .none: return options.moderated ? .visitor : .participant
        case .outcast: return .none
        }
    }

    /// Whether `viewer` sees occupants' real JIDs.
    func seesJIDs(_ viewer: Occupant) -> Bool {
        options.nonAnonymous || viewer.role == .moderator
    }

    func occupant(session: JID) -> Occupant? {
        sessions[session].flatMap { occupants[$0] }
    }

    func occupantInfo(_ occupant: Occupant, session: JID? = nil) -> MUCOccupantInfo {
        MUCOccupantInfo(nick: occupant.nick, jid: session ?? occupant.primary, role: occupant.role, affiliation: affiliation(of: occupant.user))
    }

    func sortedOccupants() -> [Occupant] {
        occupants.values.sorted { $0.sequence < $1.sequence }
    }

    // MARK: Building stanzas

    func occupantJID(_ nick: String) -> JID {
        (try? jid.with(resource: nick)) ?? jid
    }

    /// `<item/>` for an occupant as `viewer`s see it.
    func item(for occupant: Occupant, role: MUCRole? = nil, jidVisible: Bool, nick: String? = nil, actor: String? = nil,
                      reason: String? = nil, session: JID? = nil) -> XMLElement {
        var item = XMLElement(name: "item", namespace: MUCNamespace.user, attributes: [
            "affiliation": affiliation(of: occupant.user).rawValue, "role": (role ?? occupant.role).rawValue,
        ])
        if jidVisible { item[attribute: "jid"] = (session ?? occupant.primary).description }
        if let nick { item[attribute: "nick"] = nick }
        if let actor { item.append(XMLElement(name: "actor", namespace: MUCNamespace.user, attributes: ["nick": actor])) }
        if let reason { item.append(XMLElement(name: "reason", namespace: MUCNamespace.user).with(text: reason)) }
        return item
    }

    func userX(item: XMLElement? = nil, statuses: [Int] = []) -> XMLElement {
        var x = XMLElement(name: "x", namespace: MUCNamespace.user)
        if let item { x.append(item) }
        for code in statuses { x.append(XMLElement(name: "status", namespace: MUCNamespace.user, attributes: ["code": String(code)])) }
        return x
    }

    /// XEP-0421: the same for a user in this room whatever its nickname, and meaningless elsewhere.
    func occupantID(of user: JID) -> String {
        let code = HMAC<SHA256>.authenticationCode(for: Array(user.bare.description.utf8), using: SymmetricKey(data: Array(salt.utf8)))
        return Data(code.prefix(18)).base64EncodedString()
    }

    /// The occupant's presence as the room shows it, without the MUC payload.
    func reflectedPresence(of occupant: Occupant, to recipient: JID) -> XMLElement {
        var presence = XMLElement(name: "presence", namespace: Namespace.client)
        if let source = occupant.sessions[occupant.primary] {
            presence.children = source.children.filter { node in
                guard case .element(let element) = node else { return true }
                // A client's own MUC elements are never reflected (XEP-0045 §17.3), nor a stale error.
                return element.namespace != MUCNamespace.muc && element.namespace != MUCNamespace.user
                    && element.namespace != MUCNamespace.occupantID && element.name != "error"
            }
        }
        presence[attribute: "from"] = occupantJID(occupant.nick).description
        presence[attribute: "to"] = recipient.description
        presence.append(XMLElement(name: "occupant-id", namespace: MUCNamespace.occupantID, attributes: ["id": occupant.occupantID]))
        return presence
    }

    func unavailable(from occupant: Occupant, to recipient: JID, status: XMLElement? = nil) -> XMLElement {
        var presence = XMLElement(name: "presence", namespace: Namespace.client, attributes: [
            "from": occupantJID(occupant.nick).description, "to": recipient.description, "type": "unavailable",
        ])
        if let status { presence.append(status) }
        presence.append(XMLElement(name: "occupant-id", namespace: MUCNamespace.occupantID, attributes: ["id": occupant.occupantID]))
        return presence
    }

    /// Presence of `occupant` to every session of every occupant that sees it (`statuses` go to the
    /// occupant's own sessions only, with 110).
    func broadcastPresence(of occupant: Occupant, selfStatuses: [Int] = [], othersStatuses: [Int] = []) {
        let broadcast = options.presenceBroadcast.contains(occupant.role)
        for recipient in sortedOccupants() {
            let isSelf = recipient.nick == occupant.nick
            guard isSelf || broadcast else { continue }
            for session in recipient.sessions.keys {
                var presence = reflectedPresence(of: occupant, to: session)
                presence.append(userX(item: item(for: occupant, jidVisible: isSelf || seesJIDs(recipient)),
                                      statuses: isSelf ? [110] + selfStatuses : othersStatuses))
                send(presence)
            }
        }
    }

    /// The error answer to `stanza`, from the entity it was addressed to (`by` the room).
    func refuse(_ input: ComponentStanza, _ condition: StanzaErrorCondition, text: String? = nil, type: String? = nil) {
        refuse(input, StanzaError(condition, text: text, type: type))
    }

    func refuse(_ input: ComponentStanza, _ error: StanzaError) {
        let stanza = input.stanza
        guard stanza[attribute: "type"] != "error", stanza[attribute: "type"] != "result" else { return }
        var reply = stanza.errorReply(error)
        reply[attribute: "from"] = input.to.description
        reply[attribute: "to"] = input.from.description
        if let index = reply.children.lastIndex(where: { if case .element(let e) = $0 { return e.name == "error" } else { return false } }),
           case .element(var error) = reply.children[index] {
            error[attribute: "by"] = jid.description
            reply.children[index] = .element(error)
        }
        send(reply)
    }

    // MARK: Presence

    func presence(_ input: ComponentStanza, now: Double) {
        let stanza = input.stanza
        let session = input.from
        switch stanza[attribute: "type"] {
        case nil:
            guard let nick = input.to.resourcepart else {
                refuse(input, .jidMalformed, text: "a nickname is needed to enter the room")
                return
            }
            if let current = sessions[session] {
                if current == nick {
                    let resync = stanza.child("x", namespace: MUCNamespace.muc) != nil
                    update(session: session, nick: nick, presence: stanza, resync: resync, now: now)
                } else {
                    changeNick(input, session: session, from: current, to: nick)
                }
            } else if stanza.child("x", namespace: MUCNamespace.muc) == nil {
                // Groupchat 1.0 join or a client that lost track of the room (XEP-0045 §7.2.2): tell it.
                var kick = XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                    "from": input.to.description, "to": session.description, "type": "unavailable",
                ])
                kick.append(userX(item: XMLElement(name: "item", namespace: MUCNamespace.user, attributes: ["affiliation": affiliation(of: session).rawValue, "role": "none"]),
                                  statuses: [110, 307, 333]))
                send(kick)
            } else {
                join(input, nick: nick, now: now)
            }
        case "unavailable":
            // From an occupant to any of the room's JIDs it leaves; from anyone else it is ignored.
            if let nick = sessions[session] { leave(session: session, nick: nick, status: stanza.child("status")) }
        case "error":
            // An occupant's client refusing room traffic is gone for the room's purposes (a ghost).
            if let nick = sessions[session] { leave(session: session, nick: nick, status: nil, codes: [333]) }
        default:
            break
        }
    }

    func validNick(_ nick: String) -> Bool {
        !nick.unicodeScalars.allSatisfy { $0.properties.isWhitespace } && nick.count <= settings.maxNickLength
    }

    /// A nickname another user holds or has reserved.
    func nickTaken(_ nick: String, by user: JID) -> Bool {
        if let holder = occupants[nick], holder.user != user.bare { return true }
        return affiliations.contains { $0.key != user.bare && $0.value.nick == nick && $0.value.affiliation != .outcast }
    }

    func join(_ input: ComponentStanza, nick: String, now: Double) {
        let session = input.from
        let user = session.bare
        let affiliation = affiliation(of: user)
        // Another session of the same user under the same nickname: it shares the occupant (§7.2.9).
        if var occupant = occupants[nick], occupant.user == user {
            occupant.sessions[session] = input.stanza
            occupant.primary = session
            occupants[nick] = occupant
            sessions[session] = nick
            output.append(.joined(session))
            sendRoomState(to: session, occupant: occupant, joinStanza: input.stanza, created: false, now: now)
            return
        }
        guard validNick(nick) else {
            refuse(input, .notAcceptable, text: "that nickname is not allowed here (at most \(settings.maxNickLength) characters, not only spaces)")
            return
        }
        if affiliation == .outcast {
            refuse(input, .forbidden, text: "you are banned from this room")
            return
        }
        if locked && affiliation != .owner {
            refuse(input, .itemNotFound, text: "the room is not configured yet")
            return
        }
        if options.membersOnly && affiliation.rank < MUCAffiliation.member.rank {
            refuse(input, .registrationRequired, text: "this room is for members only")
            return
        }
        if options.passwordProtected && affiliation != .owner {
            let given = input.stanza.child("x", namespace: MUCNamespace.muc)?.child("password", namespace: MUCNamespace.muc)?.text
            guard given == options.password else {
                refuse(input, .notAuthorized, text: "a password is needed to enter this room")
                return
            }
        }
        if nickTaken(nick, by: user) {
            refuse(input, .conflict, text: "that nickname is taken in this room")
            return
        }
        let limit = min(options.maxOccupants, settings.maxOccupants)
        // Admins and owners may still enter a full room, up to a margin (§7.2.10).
        if occupants.count >= limit && (affiliation.rank < MUCAffiliation.admin.rank || occupants.count >= limit + 10) {
            refuse(input, .serviceUnavailable, text: "the room is full", type: "wait")
            return
        }
        let grant = Adjustable(MUCGrant(role: defaultRole(for: affiliation), affiliation: affiliation))
        let event = MUCJoinEvent(room: info, occupant: MUCOccupantInfo(nick: nick, jid: session, role: grant.value.role, affiliation: affiliation),
                                 stanza: input.stanza, grant: grant)
        switch hooks.run(.mucJoin, event) {
        case .pass, .modify: break
        case .handled: return
        case .reject(let condition, let text):
            refuse(input, condition, text: text)
            return
        case .refuse(let error):
            refuse(input, error)
            return
        }
        if grant.value.affiliation != affiliation, !settings.serviceAdmins.contains(user) {
            setAffiliation(user, grant.value.affiliation, reason: nil)
            if grant.value.affiliation == .outcast { return refuse(input, .forbidden, text: "you are banned from this room") }
        }
        sequence += 1
        let occupant = Occupant(nick: nick, user: user, sessions: [session: input.stanza], primary: session,
                                role: grant.value.role == .none ? defaultRole(for: grant.value.affiliation) : grant.value.role,
                                sequence: sequence, occupantID: occupantID(of: user), tokens: settings.messageBurst, refilled: now)
        occupants[nick] = occupant
        sessions[session] = nick
        output.append(.joined(session))
        let created = justCreated
        justCreated = false
        // Everyone else learns of the newcomer; the newcomer gets the room's state, its own presence last.
        for other in sortedOccupants() where other.nick != nick {
            guard options.presenceBroadcast.contains(occupant.role) else { break }
            for otherSession in other.sessions.keys {
                var presence = reflectedPresence(of: occupant, to: otherSession)
                presence.append(userX(item: item(for: occupant, jidVisible: seesJIDs(other))))
                send(presence)
            }
        }
        sendRoomState(to: session, occupant: occupant, joinStanza: input.stanza, created: created, now: now)
    }

    /// What a (re)joining session receives: the other occupants, its own presence, history and subject.
    func sendRoomState(to session: JID, occupant: Occupant, joinStanza: XMLElement, created: Bool, now: Double) {
        let seesJIDs = seesJIDs(occupant)
        for other in sortedOccupants() where other.nick != occupant.nick && options.presenceBroadcast.contains(other.role) {
            var presence = reflectedPresence(of: other, to: session)
            presence.append(userX(item: item(for: other, jidVisible: seesJIDs)))
            send(presence)
        }
        var statuses = [110]
        if options.nonAnonymous { statuses.append(100) }
        if options.enableLogging { statuses.append(170) }
        if created { statuses.append(201) }
        var own = reflectedPresence(of: occupant, to: session)
        own[attribute: "id"] = joinStanza[attribute: "id"]
        own.append(userX(item: item(for: occupant, jidVisible: true, session: session), statuses: statuses))
        send(own)
        sendHistory(to: session, request: joinStanza.child("x", namespace: MUCNamespace.muc)?.child("history", namespace: MUCNamespace.muc), now: now)
        var subjectMessage = XMLElement(name: "message", namespace: Namespace.client, attributes: [
            "from": (subjectNick.map { occupantJID($0) } ?? jid).description, "to": session.description, "type": "groupchat",
            "id": StanzaID.next(),
        ])
        subjectMessage.append(XMLElement(name: "subject", namespace: Namespace.client).with(text: subject))
        if let subjectTime {
            subjectMessage.append(XMLElement(name: "delay", namespace: MUCNamespace.delay, attributes: ["from": jid.description, "stamp": XMPPDateTime.string(subjectTime)]))
        }
        send(subjectMessage)
    }

    /// Discussion history within the join's limits (XEP-0045 §7.2.13–14), oldest first.
    func sendHistory(to session: JID, request: XMLElement?, now: Double) {
        var selected = history
        if let text = request?[attribute: "maxstanzas"], let count = Int(text) { selected = Array(selected.suffix(max(0, count))) }
        if let text = request?[attribute: "seconds"], let seconds = Double(text) { selected = selected.filter { now - $0.time <= seconds } }
        if let text = request?[attribute: "since"], let since = XMPPDateTime.parse(text) { selected = selected.filter { $0.time >= since } }
        if let text = request?[attribute: "maxchars"], let limit = Int(text) {
            var total = 0
            var kept: [HistoryEntry] = []
            for entry in selected.reversed() {
                total += entry.size
                guard total <= limit else { break }
                kept.insert(entry, at: 0)
            }
            selected = kept
        }
        for entry in selected {
            var message = entry.stanza
            message[attribute: "to"] = session.description
            message.append(XMLElement(name: "delay", namespace: MUCNamespace.delay, attributes: ["from": jid.description, "stamp": XMPPDateTime.string(entry.time)]))
            send(message)
        }
    }

    /// A presence change from an occupant (or a full resynchronisation when it says it joins again).
    func update(session: JID, nick: String, presence: XMLElement, resync: Bool, now: Double) {
        guard var occupant = occupants[nick] else { return }
        let changed = occupant.sessions[session].map { Self.presenceChanged($0, presence) } ?? true
        occupant.sessions[session] = presence
        occupant.primary = session
        if !resync || changed {
            guard take(&occupant, now: now) else {
                occupants[nick] = occupant
                return
            }
        }
        occupants[nick] = occupant
        if resync {
            if changed { broadcastPresenceToOthers(occupant) }
            sendRoomState(to: session, occupant: occupant, joinStanza: presence, created: false, now: now)
        } else {
            broadcastPresence(of: occupant)
        }
    }

    func broadcastPresenceToOthers(_ occupant: Occupant) {
        guard options.presenceBroadcast.contains(occupant.role) else { return }
        for other in sortedOccupants() where other.nick != occupant.nick {
            for session in other.sessions.keys {
                var presence = reflectedPresence(of: occupant, to: session)
                presence.append(userX(item: item(for: occupant, jidVisible: seesJIDs(other))))
                send(presence)
            }
        }
    }

    private static func presenceChanged(_ old: XMLElement, _ new: XMLElement) -> Bool {
        func significant(_ presence: XMLElement) -> [XMLElement] {
            presence.elements.filter { $0.namespace != MUCNamespace.muc }
        }
        return significant(old) != significant(new)
    }

    func changeNick(_ input: ComponentStanza, session: JID, from oldNick: String, to newNick: String) {
        guard var occupant = occupants[oldNick] else { return }
        guard validNick(newNick) else {
            refuse(input, .notAcceptable, text: "that nickname is not allowed here (at most \(settings.maxNickLength) characters, not only spaces)")
            return
        }
        if occupants[newNick] != nil || nickTaken(newNick, by: occupant.user) {
            refuse(input, .conflict, text: "that nickname is taken in this room")
            return
        }
        switch hooks.run(.mucNickChange, MUCNickChangeEvent(room: info, occupant: occupantInfo(occupant, session: session), newNick: newNick)) {
        case .pass, .modify: break
        case .handled: return
        case .reject(let condition, let text):
            refuse(input, condition, text: text)
            return
        case .refuse(let error):
            refuse(input, error)
            return
        }
        // Everyone sees the old nickname leave with 303 and the new one arrive (§7.6).
        let broadcast = options.presenceBroadcast.contains(occupant.role)
        for recipient in sortedOccupants() {
            let isSelf = recipient.nick == oldNick
            guard isSelf || broadcast else { continue }
            for recipientSession in recipient.sessions.keys {
                var presence = unavailable(from: occupant, to: recipientSession)
                presence.append(userX(item: item(for: occupant, jidVisible: isSelf || seesJIDs(recipient), nick: newNick),
                                      statuses: isSelf ? [110, 303] : [303]))
                send(presence)
            }
        }
        occupants[oldNick] = nil
        occupant.nick = newNick
        occupant.sessions[session] = input.stanza
        occupant.primary = session
        occupants[newNick] = occupant
        for other in occupant.sessions.keys { sessions[other] = newNick }
        broadcastPresence(of: occupant)
    }

    /// One session leaves; the occupant leaves with its last session.
    func leave(session: JID, nick: String, status: XMLElement?, codes: [Int] = []) {
        guard var occupant = occupants[nick] else { return }
        sessions[session] = nil
        output.append(.left(session))
        occupant.sessions[session] = nil
        if !occupant.sessions.isEmpty {
            // Other sessions stay: only this one is told it left.
            var presence = unavailable(from: occupant, to: session, status: status)
            presence.append(userX(item: item(for: occupant, role: MUCRole.none, jidVisible: true, session: session), statuses: [110] + codes))
            send(presence)
            if occupant.primary == session { occupant.primary = occupant.sessions.keys.first! }
            occupants[nick] = occupant
            return
        }
        removeOccupant(occupant, status: status, codes: codes, departed: session)
        closeIfAbandoned()
    }

    /// Removes an occupant, telling it (110) and everyone who saw it (`codes` to both).
    func removeOccupant(_ occupant: Occupant, status: XMLElement? = nil, codes: [Int], actor: String? = nil, reason: String? = nil,
                                departed: JID? = nil) {
        let broadcast = options.presenceBroadcast.contains(occupant.role)
        occupants[occupant.nick] = nil
        for session in occupant.sessions.keys {
            sessions[session] = nil
            output.append(.left(session))
        }
        var told = Array(occupant.sessions.keys)
        if let departed, !told.contains(departed) { told.append(departed) }
        for session in told {
            var presence = unavailable(from: occupant, to: session, status: status)
            presence.append(userX(item: item(for: occupant, role: MUCRole.none, jidVisible: true, actor: actor, reason: reason, session: session),
                                  statuses: [110] + codes))
            send(presence)
        }
        guard broadcast else { return }
        for recipient in sortedOccupants() {
            for session in recipient.sessions.keys {
                var presence = unavailable(from: occupant, to: session, status: status)
                presence.append(userX(item: item(for: occupant, role: MUCRole.none, jidVisible: seesJIDs(recipient), actor: actor, reason: reason),
                                      statuses: codes))
                send(presence)
            }
        }
    }

    /// A locked room whose owners left is destroyed (§10.1.3); a temporary room closes with its last
    /// occupant.
    func closeIfAbandoned() {
        if locked && !occupants.values.contains(where: { affiliation(of: $0.user) == .owner }) {
            for occupant in sortedOccupants() {
                removeOccupant(occupant, codes: [], reason: "the room was never configured")
            }
            output.append(.closed)
            return
        }
        if occupants.isEmpty && !options.persistent { output.append(.closed) }
    }

    /// Takes one message's worth from the occupant's rate bucket; false when it is empty.
    func take(_ occupant: inout Occupant, now: Double) -> Bool {
        occupant.tokens = min(settings.messageBurst, occupant.tokens + (now - occupant.refilled) * settings.messageRate)
        occupant.refilled = now
        guard occupant.tokens >= 1 else { return false }
        occupant.tokens -= 1
        return true
    }

    // MARK: Messages

    func message(_ input: ComponentStanza, now: Double) {
        let stanza = input.stanza
        let type = stanza[attribute: "type"] ?? "normal"
        if let nick = input.to.resourcepart {
            privateMessage(input, to: nick, type: type, now: now)
            return
        }
        if type == "error" { return }
        if type != "groupchat" {
            if let x = stanza.child("x", namespace: MUCNamespace.user), x.child("invite") != nil || x.child("decline") != nil {
                invitations(input, x: x)
            } else if let form = DataForm.first(in: stanza), form.formType == MUCNamespace.request {
                voiceRequest(input, form: form)
            } else {
                refuse(input, .badRequest, text: "messages to the room must be of type groupchat")
            }
            return
        }
        guard let nick = sessions[input.from], var occupant = occupants[nick] else {
            refuse(input, .notAcceptable, text: "only occupants may send messages to the room")
            return
        }
        guard take(&occupant, now: now) else {
            occupants[nick] = occupant
            refuse(input, .resourceConstraint, text: "too many messages: slow down", type: "wait")
            return
        }
        occupants[nick] = occupant
        let isSubjectChange = stanza.child("subject") != nil && stanza.child("body") == nil && stanza.child("thread") == nil
        let point: HookPoint<MUCMessageEvent> = isSubjectChange ? .mucSubjectChange : .mucGroupchatMessage
        guard var message = runMessageHook(point, input, sender: &occupant, recipient: nil) else { return }
        if isSubjectChange {
            changeSubject(input, message: message, occupant: occupant, now: now)
            return
        }
        guard occupant.role == .moderator || occupant.role == .participant else {
            refuse(input, .forbidden, text: "you have no voice in this room")
            return
        }
        // The room is the only authority on its stanza ids (XEP-0359 §5) and occupant ids (XEP-0421).
        message.children.removeAll { node in
            guard case .element(let element) = node else { return false }
            return (element.name == "stanza-id" && element.namespace == MUCNamespace.stanzaID && element[attribute: "by"] == jid.description)
                || element.namespace == MUCNamespace.occupantID
        }
        message[attribute: "from"] = occupantJID(occupant.nick).description
        message[attribute: "to"] = nil
        if message[attribute: "id"] == nil { message[attribute: "id"] = StanzaID.next() }
        message.append(XMLElement(name: "occupant-id", namespace: MUCNamespace.occupantID, attributes: ["id": occupant.occupantID]))
        let stanzaID = StanzaID.next()
        message.append(XMLElement(name: "stanza-id", namespace: MUCNamespace.stanzaID, attributes: ["id": stanzaID, "by": jid.description]))
        if let body = message.child("body") {
            if settings.historySize > 0 {
                history.append(HistoryEntry(stanza: message, time: now))
                if history.count > settings.historySize { history.removeFirst(history.count - settings.historySize) }
            }
            if archiving {
                let stored = ArchivedMessage(id: stanzaID, with: input.from, stanza: message.serialized(inheritedNamespace: Namespace.client), body: body.text)
                output.append(.archive(stored, sender: input.from))
            }
        }
        output.append(.broadcast(message, allSessions))
    }

    /// Runs a message hook; nil when the message goes no further. Applies a role change or a kick the
    /// hook asked for.
    func runMessageHook(_ point: HookPoint<MUCMessageEvent>, _ input: ComponentStanza, sender occupant: inout Occupant,
                                recipient: Occupant?) -> XMLElement? {
        let role = Adjustable(occupant.role)
        let kick = Adjustable<String?>(nil)
        let event = MUCMessageEvent(room: info, sender: occupantInfo(occupant, session: input.from), recipient: recipient.map { occupantInfo($0) },
                                    stanza: input.stanza, senderRole: role, kick: kick)
        let result = hooks.run(point, event)
        if let reason = kick.value {
            refuse(input, .notAcceptable, text: reason)
            removeOccupant(occupant, codes: [307], reason: reason)
            closeIfAbandoned()
            return nil
        }
        if role.value != occupant.role && role.value != .none {
            occupant.role = role.value
            occupants[occupant.nick] = occupant
            broadcastPresence(of: occupant)
        }
        switch result {
        case .pass: return input.stanza
        case .modify(let stanza): return stanza
        case .handled: return nil
        case .reject(let condition, let text):
            refuse(input, condition, text: text)
            return nil
        case .refuse(let error):
            refuse(input, error)
            return nil
        }
    }

    func changeSubject(_ input: ComponentStanza, message: XMLElement, occupant: Occupant, now: Double) {
        guard occupant.role == .moderator || (options.changeSubject && occupant.role == .participant) else {
            refuse(input, .forbidden, text: "only moderators may change the subject")
            return
        }
        let text = message.child("subject")?.text ?? ""
        guard text.count <= settings.maxSubjectLength else {
            refuse(input, .notAcceptable, text: "the subject is longer than \(settings.maxSubjectLength) characters")
            return
        }
        subject = text
        subjectNick = occupant.nick
        subjectTime = now
        var reflected = message
        reflected[attribute: "from"] = occupantJID(occupant.nick).description
        reflected[attribute: "to"] = nil
        if reflected[attribute: "id"] == nil { reflected[attribute: "id"] = StanzaID.next() }
        output.append(.broadcast(reflected, allSessions))
        if options.persistent { output.append(.store(.options(stored))) }
    }

    func privateMessage(_ input: ComponentStanza, to nick: String, type: String, now: Double) {
        guard type != "groupchat" else {
            refuse(input, .badRequest, text: "private messages may not be of type groupchat")
            return
        }
        guard let senderNick = sessions[input.from], var sender = occupants[senderNick] else {
            if type != "error" { refuse(input, .notAcceptable, text: "only occupants may send private messages") }
            return
        }
        guard let recipient = occupants[nick] else {
            refuse(input, .itemNotFound, text: "no occupant with that nickname")
            return
        }
        if type != "error" {
            let allowed: Bool
            switch options.allowPrivateMessages {
            case .anyone: allowed = true
            case .participants: allowed = sender.role == .participant || sender.role == .moderator
            case .moderators: allowed = sender.role == .moderator
            case .none: allowed = false
            }
            guard allowed else {
                refuse(input, .forbidden, text: "private messages are not allowed here")
                return
            }
            guard take(&sender, now: now) else {
                occupants[senderNick] = sender
                refuse(input, .resourceConstraint, text: "too many messages: slow down", type: "wait")
                return
            }
            occupants[senderNick] = sender
        }
        var message = input.stanza
        if type != "error" {
            guard let hooked = runMessageHook(.mucPrivateMessage, input, sender: &sender, recipient: recipient) else { return }
            message = hooked
        }
        message[attribute: "from"] = occupantJID(senderNick).description
        if message.child("x", namespace: MUCNamespace.user) == nil { message.append(XMLElement(name: "x", namespace: MUCNamespace.user)) }
        for session in recipient.sessions.keys {
            var copy = message
            copy[attribute: "to"] = session.description
            send(copy)
        }
    }

    /// Mediated invitations and declines (XEP-0045 §7.8.2).
    func invitations(_ input: ComponentStanza, x: XMLElement) {
        let inviter = occupant(session: input.from)
        let inviterAffiliation = affiliation(of: input.from)
        for invite in x.elements where invite.name == "invite" {
            guard let invitee = invite[attribute: "to"].flatMap({ JID($0) }) else {
                refuse(input, .jidMalformed, text: "an invitation needs a 'to'")
                return
            }
            guard inviter != nil || inviterAffiliation.rank >= MUCAffiliation.admin.rank else {
                refuse(input, .notAcceptable, text: "only occupants may invite")
                return
            }
            if options.membersOnly {
                guard options.allowInvites ? inviterAffiliation.rank >= MUCAffiliation.member.rank : inviterAffiliation.rank >= MUCAffiliation.admin.rank else {
                    refuse(input, .forbidden, text: "only admins may invite to this members-only room")
                    return
                }
                if affiliation(of: invitee).rank < MUCAffiliation.member.rank && affiliation(of: invitee) != .outcast {
                    setAffiliation(invitee.bare, .member, reason: nil)
                }
            }
            var inviteOut = XMLElement(name: "invite", namespace: MUCNamespace.user, attributes: [
                "from": options.nonAnonymous || inviter == nil ? input.from.bare.description : occupantJID(inviter!.nick).description,
            ])
            if let reason = invite.child("reason") { inviteOut.append(reason) }
            var xOut = XMLElement(name: "x", namespace: MUCNamespace.user)
            xOut.append(inviteOut)
            if options.passwordProtected { xOut.append(XMLElement(name: "password", namespace: MUCNamespace.user).with(text: options.password)) }
            var message = XMLElement(name: "message", namespace: Namespace.client, attributes: [
                "from": jid.description, "to": invitee.description, "id": input.stanza[attribute: "id"] ?? StanzaID.next(),
            ])
            message.append(xOut)
            let reasonText = invite.child("reason")?.text
            message.append(XMLElement(name: "body", namespace: Namespace.client)
                .with(text: "\(input.from.bare) invites you to the room \(jid)" + (reasonText.map { ": \($0)" } ?? "")))
            send(message)
        }
        for decline in x.elements where decline.name == "decline" {
            guard let inviter = decline[attribute: "to"].flatMap({ JID($0) }) else { continue }
            var declineOut = XMLElement(name: "decline", namespace: MUCNamespace.user, attributes: ["from": input.from.bare.description])
            if let reason = decline.child("reason") { declineOut.append(reason) }
            var xOut = XMLElement(name: "x", namespace: MUCNamespace.user)
            xOut.append(declineOut)
            var message = XMLElement(name: "message", namespace: Namespace.client, attributes: ["from": jid.description, "to": inviter.description])
            message.append(xOut)
            send(message)
        }
    }

    /// A visitor asks for voice, or a moderator answers such a request (XEP-0045 §7.13, §8.6).
    func voiceRequest(_ input: ComponentStanza, form: DataForm) {
        guard let requester = occupant(session: input.from) else {
            refuse(input, .notAcceptable, text: "only occupants may ask for voice")
            return
        }
        if form.type == .submit, let allow = form.boolean("muc#request_allow") {
            // A moderator's answer.
            guard requester.role == .moderator else {
                refuse(input, .forbidden, text: "only moderators may grant voice")
                return
            }
            guard allow, let nick = form["muc#roomnick"]?.value, var target = occupants[nick], target.role == .visitor else { return }
            target.role = .participant
            occupants[nick] = target
            broadcastPresence(of: target)
            return
        }
        guard options.allowVoiceRequests, requester.role == .visitor else {
            refuse(input, .notAllowed, text: "voice requests are not accepted here")
            return
        }
        let approval = DataForm(type: .form, formType: MUCNamespace.request, title: "Voice request", fields: [
            DataForm.Field("muc#role", type: "list-single", label: "Requested role", values: ["participant"]),
            DataForm.Field("muc#jid", type: "jid-single", label: "User ID", values: [input.from.description]),
            DataForm.Field("muc#roomnick", type: "text-single", label: "Room nickname", values: [requester.nick]),
            DataForm.Field("muc#request_allow", type: "boolean", label: "Grant voice to this person?", values: ["0"]),
        ])
        for moderator in sortedOccupants() where moderator.role == .moderator {
            for session in moderator.sessions.keys {
                var message = XMLElement(name: "message", namespace: Namespace.client, attributes: [
                    "from": jid.description, "to": session.description, "id": StanzaID.next(),
                ])
                message.append(approval.element)
                send(message)
            }
        }
    }

    // MARK: IQs

    func iq(_ input: ComponentStanza, now: Double) {
        let stanza = input.stanza
        let type = stanza[attribute: "type"]
        if let nick = input.to.resourcepart {
            occupantIQ(input, to: nick, type: type)
            return
        }
        guard type == "get" || type == "set", let payload = stanza.elements.first else {
            if type == "get" || type == "set" { refuse(input, .badRequest) }
            return
        }
        switch (payload.name, payload.namespace, type) {
        case ("query", MUCNamespace.discoInfo, "get"): discoInfo(input, payload: payload)
        case ("query", MUCNamespace.discoItems, "get"):
            guard !locked || affiliation(of: input.from) == .owner else { return refuse(input, .itemNotFound) }
            send(result(input, XMLElement(name: "query", namespace: MUCNamespace.discoItems)))
        case ("query", MUCNamespace.admin, "get"): adminGet(input, payload: payload)
        case ("query", MUCNamespace.admin, "set"): adminSet(input, payload: payload)
        case ("query", MUCNamespace.owner, "get"): ownerGet(input)
        case ("query", MUCNamespace.owner, "set"): ownerSet(input, payload: payload)
        case ("query", MUCNamespace.iqRegister, "get"): registrationGet(input)
        case ("query", MUCNamespace.iqRegister, "set"): registrationSet(input, payload: payload)
        case ("ping", Namespace.ping, "get"): send(result(input, nil))
        case ("query", MAMNamespace.mam, _), ("metadata", MAMNamespace.mam, "get"): archiveRequest(input)
        default: refuse(input, .serviceUnavailable)
        }
    }

    /// Messages are archived: the service archives, the room is persistent and its owners want it.
    var archiving: Bool { settings.archiving && options.persistent && options.enableArchiving }

    /// XEP-0313 §7.1.2: whoever may enter may read the archive; real JIDs only for those who could see them.
    func archiveRequest(_ input: ComponentStanza) {
        guard !locked || affiliation(of: input.from) == .owner else { return refuse(input, .itemNotFound) }
        guard archiving else { return refuse(input, .serviceUnavailable, text: "this room keeps no archive") }
        let rank = affiliation(of: input.from).rank
        guard affiliation(of: input.from) != .outcast else { return refuse(input, .forbidden, text: "you are banned from this room") }
        guard !options.membersOnly || rank >= MUCAffiliation.member.rank else {
            return refuse(input, .registrationRequired, text: "the archive of a members-only room is for its members")
        }
        output.append(.archiveRequest(input, realJIDs: options.nonAnonymous || rank >= MUCAffiliation.admin.rank))
    }

    func result(_ input: ComponentStanza, _ payload: XMLElement?) -> XMLElement {
        var reply = input.stanza.iqResult(payload: payload)
        reply[attribute: "from"] = input.to.description
        reply[attribute: "to"] = input.from.description
        return reply
    }

    /// IQs to an occupant JID: self-pings are answered here (XEP-0410); others are relayed to one of the
    /// occupant's sessions, and the answer back, without revealing either side's real JID.
    func occupantIQ(_ input: ComponentStanza, to nick: String, type: String?) {
        let stanza = input.stanza
        if type == "result" || type == "error" {
            guard let id = stanza[attribute: "id"], let pending = forwardedIQs.removeValue(forKey: id),
                  sessions[input.from] == pending.target else { return }
            forwardedOrder.removeAll { $0 == id }
            var answer = stanza
            answer[attribute: "id"] = pending.id
            answer[attribute: "from"] = occupantJID(pending.target).description
            answer[attribute: "to"] = pending.requester.description
            send(answer)
            return
        }
        guard type == "get" || type == "set" else { return refuse(input, .badRequest) }
        guard let senderNick = sessions[input.from] else {
            refuse(input, .notAcceptable, text: "you are not an occupant of this room")
            return
        }
        if senderNick == nick, stanza.child("ping", namespace: Namespace.ping) != nil {
            send(result(input, nil))
            return
        }
        guard let target = occupants[nick] else {
            refuse(input, .itemNotFound, text: "no occupant with that nickname")
            return
        }
        let id = StanzaID.next()
        forwardedIQs[id] = (input.from, stanza[attribute: "id"] ?? "", nick)
        forwardedOrder.append(id)
        if forwardedOrder.count > settings.maxForwardedIQs { forwardedIQs[forwardedOrder.removeFirst()] = nil }
        var relayed = stanza
        relayed[attribute: "id"] = id
        relayed[attribute: "from"] = occupantJID(senderNick).description
        relayed[attribute: "to"] = target.primary.description
        send(relayed)
    }

    func discoInfo(_ input: ComponentStanza, payload: XMLElement) {
        guard !locked || affiliation(of: input.from) == .owner else { return refuse(input, .itemNotFound) }
        var query = XMLElement(name: "query", namespace: MUCNamespace.discoInfo)
        if let node = payload[attribute: "node"] {
            guard node == "x-roomuser-item" else { return refuse(input, .itemNotFound) }
            query[attribute: "node"] = node
            if let nick = affiliations[input.from.bare]?.nick {
                query.append(XMLElement(name: "identity", namespace: MUCNamespace.discoInfo, attributes: ["category": "conference", "type": "text", "name": nick]))
            }
            send(result(input, query))
            return
        }
        query.append(XMLElement(name: "identity", namespace: MUCNamespace.discoInfo, attributes: [
            "category": "conference", "type": "text", "name": options.name.isEmpty ? (jid.localpart ?? jid.description) : options.name,
        ]))
        var features = [MUCNamespace.muc, MUCNamespace.stableID, MUCNamespace.selfPing, MUCNamespace.occupantID, MUCNamespace.iqRegister,
                        MUCNamespace.request, MUCNamespace.discoInfo, MUCNamespace.discoItems]
        features.append(options.isPublic ? "muc_public" : "muc_hidden")
        features.append(options.membersOnly ? "muc_membersonly" : "muc_open")
        features.append(options.moderated ? "muc_moderated" : "muc_unmoderated")
        features.append(options.persistent ? "muc_persistent" : "muc_temporary")
        features.append(options.nonAnonymous ? "muc_nonanonymous" : "muc_semianonymous")
        features.append(options.passwordProtected ? "muc_passwordprotected" : "muc_unsecured")
        if archiving { features += [MAMNamespace.mam, MAMNamespace.extended, MAMNamespace.stanzaID] }
        for feature in features.sorted() {
            query.append(XMLElement(name: "feature", namespace: MUCNamespace.discoInfo, attributes: ["var": feature]))
        }
        let roomInfo = DataForm(type: .result, formType: MUCNamespace.roomInfo, fields: [
            DataForm.Field("muc#roominfo_description", label: "Description", values: [options.description]),
            DataForm.Field("muc#roominfo_occupants", label: "Number of occupants", values: [String(occupants.count)]),
            DataForm.Field("muc#roominfo_subject", label: "Subject", values: [subject]),
            DataForm.Field("muc#roominfo_subjectmod", type: "boolean", label: "Occupants may change the subject", values: [options.changeSubject ? "1" : "0"]),
            DataForm.Field("muc#roominfo_lang", label: "Language", values: [options.language]),
            DataForm.Field("muc#roomconfig_roomname", label: "Name", values: [options.name]),
        ])
        query.append(roomInfo.element)
        send(result(input, query))
    }

    // MARK: Changing roles and affiliations

    enum NickChange {
        case keep, set(String), clear
    }

    /// Stores an affiliation (`.none` removes the user's record, reserved nickname included) and reports
    /// the owners when they change.
    func setAffiliation(_ user: JID, _ affiliation: MUCAffiliation, nick change: NickChange = .keep, reason: String?) {
        let before = owners
        var nick: String?
        switch change {
        case .keep: nick = affiliations[user]?.nick
        case .set(let new): nick = new
        case .clear: nick = nil
        }
        // Outcasts keep no reserved nickname (§9.1).
        if affiliation == .outcast || affiliation == .none { nick = nil }
        let record = MUCAffiliationRecord(affiliation: affiliation, nick: nick, reason: reason)
        affiliations[user] = affiliation == .none ? nil : record
        if options.persistent && !locked { output.append(.store(.affiliation(user, record))) }
        if owners != before { output.append(.owners(owners)) }
    }

    /// After `user`'s affiliation changed: its occupants get the role that goes with it, leave a
    /// members-only room they may no longer be in (321), or are banned out (301).
    func applyAffiliationChange(to user: JID, actor: String?, reason: String?) {
        let affiliation = affiliation(of: user)
        for var occupant in sortedOccupants() where occupant.user == user.bare {
            if affiliation == .outcast {
                removeOccupant(occupant, codes: [301], actor: actor, reason: reason)
            } else if options.membersOnly && affiliation.rank < MUCAffiliation.member.rank {
                removeOccupant(occupant, codes: [321], actor: actor, reason: reason)
            } else {
                let role = defaultRole(for: affiliation)
                if role.rankAsRole > occupant.role.rankAsRole || affiliation.rank <= MUCAffiliation.member.rank && occupant.role == .moderator {
                    occupant.role = role
                }
                occupants[occupant.nick] = occupant
                broadcastPresence(of: occupant)
            }
        }
    }

    /// Changes an occupant's role (a kick is `.none`) and tells the room.
    func applyRole(_ role: MUCRole, to nick: String, actor: String?, reason: String?) {
        guard var occupant = occupants[nick] else { return }
        if role == .none {
            removeOccupant(occupant, codes: [307], actor: actor, reason: reason)
            return
        }
        occupant.role = role
        occupants[nick] = occupant
        broadcastPresence(of: occupant)
    }

}

extension MUCRole {
    /// moderator 3, participant 2, visitor 1, none 0.
    var rankAsRole: Int {
        switch self {
        case .moderator: return 3
        case .participant: return 2
        case .visitor: return 1
        case .none: return 0
        }
    }
}

