import StarlingAPI

/// MUC policy events for scripts: each MUC hook point becomes a Lua event whose table carries the room
/// (`event.room`), the acting occupant (`event.occupant`) and what else the decision is about, and whose
/// "modify" verdict adjusts what the hook point lets policies adjust.
extension LuaHooks {
    func registerMUC(_ registrar: ModuleRegistrar) {
        registrar.hook(.mucRoomCreate, priority: priority) { [self] event in
            runMUC("muc-create", XMLElement(name: "room", namespace: Namespace.client), tables: [
                LuaTable("", [("actor", .string(event.actor.description)), ("nick", .string(event.nick ?? "")),
                              ("owned_rooms", .number(Double(event.ownedRooms)))]),
                Self.roomTable(event.room),
            ]).result
        }
        registrar.hook(.mucRoomDestroy, priority: priority) { [self] event in
            runMUC("muc-destroy", XMLElement(name: "room", namespace: Namespace.client), tables: [
                LuaTable("", [("actor", .string(event.actor.description))]), Self.roomTable(event.room),
            ]).result
        }
        registrar.hook(.mucRoomConfigure, priority: priority) { [self] event in
            let proposed = MUCRoomInfo(jid: event.room.jid, options: event.options.value, occupants: event.room.occupants, subject: event.room.subject)
            let outcome = runMUC("muc-configure", XMLElement(name: "room", namespace: Namespace.client), tables: [
                LuaTable("", [("actor", .string(event.actor.description))]), Self.roomTable(proposed),
            ])
            if let room = outcome.tables["room"] { event.options.value = Self.apply(room, to: event.options.value) }
            return outcome.result.notModifying
        }
        registrar.hook(.mucJoin, priority: priority) { [self] event in
            let outcome = runMUC("muc-join", event.stanza, tables: [Self.roomTable(event.room), Self.occupantTable(event.occupant)])
            if let occupant = outcome.tables["occupant"] {
                if case .string(let text)? = occupant["role"], let role = MUCRole(rawValue: text) { event.grant.value.role = role }
                if case .string(let text)? = occupant["affiliation"], let affiliation = MUCAffiliation(rawValue: text) {
                    event.grant.value.affiliation = affiliation
                }
            }
            return outcome.result.notModifying
        }
        for (point, name) in [(HookPoint<MUCMessageEvent>.mucGroupchatMessage, "muc-message"), (.mucPrivateMessage, "muc-private-message"),
                              (.mucSubjectChange, "muc-subject")] {
            registrar.hook(point, priority: priority) { [self] event in
                var stanza = event.stanza
                // Subject changes show their subject as the body.
                if name == "muc-subject", let subject = event.stanza.child("subject") {
                    stanza.append(XMLElement(name: "body", namespace: Namespace.client).with(text: subject.text))
                }
                var tables = [Self.roomTable(event.room), Self.occupantTable(event.sender)]
                if let recipient = event.recipient { tables.append(Self.occupantTable(recipient, named: "recipient")) }
                let outcome = runMUC(name, stanza, tables: tables)
                if let kick = outcome.kick { event.kick.value = kick }
                if case .string(let text)? = outcome.tables["occupant"]?["role"], let role = MUCRole(rawValue: text) { event.senderRole.value = role }
                guard name == "muc-subject", case .modify(var modified) = outcome.result else { return outcome.result }
                // The script's body is the new subject.
                let subject = modified.child("body")?.text ?? ""
                modified.removeChildren("body", namespace: Namespace.client)
                modified.removeChildren("subject", namespace: Namespace.client)
                modified.append(XMLElement(name: "subject", namespace: Namespace.client).with(text: subject))
                return .modify(modified)
            }
        }
        registrar.hook(.mucNickChange, priority: priority) { [self] event in
            runMUC("muc-nick", XMLElement(name: "presence", namespace: Namespace.client), tables: [
                LuaTable("", [("new_nick", .string(event.newNick))]), Self.roomTable(event.room), Self.occupantTable(event.occupant),
            ]).result.notModifying
        }
        registrar.hook(.mucModeration, priority: priority) { [self] event in
            var fields: [(key: String, value: LuaStoredValue)] = [("action", .string(event.action.rawValue)), ("actor", .string(event.actor.description))]
            if let nick = event.targetNick { fields.append(("target_nick", .string(nick))) }
            if let jid = event.targetJID { fields.append(("target_jid", .string(jid.description))) }
            if let role = event.role { fields.append(("role", .string(role.rawValue))) }
            if let affiliation = event.affiliation { fields.append(("affiliation", .string(affiliation.rawValue))) }
            if let reason = event.reason { fields.append(("reason", .string(reason))) }
            return runMUC("muc-moderate", XMLElement(name: "iq", namespace: Namespace.client), tables: [LuaTable("", fields), Self.roomTable(event.room)])
                .result.notModifying
        }
    }

    static func roomTable(_ room: MUCRoomInfo) -> LuaTable {
        let options = room.options
        return LuaTable("room", [
            ("jid", .string(room.jid.description)), ("name", .string(options.name)), ("description", .string(options.description)),
            ("language", .string(options.language)), ("persistent", .boolean(options.persistent)), ("public", .boolean(options.isPublic)),
            ("members_only", .boolean(options.membersOnly)), ("moderated", .boolean(options.moderated)),
            ("password_protected", .boolean(options.passwordProtected)), ("non_anonymous", .boolean(options.nonAnonymous)),
            ("max_occupants", .number(Double(options.maxOccupants))), ("change_subject", .boolean(options.changeSubject)),
            ("allow_invites", .boolean(options.allowInvites)), ("allow_private_messages", .string(options.allowPrivateMessages.rawValue)),
            ("enable_logging", .boolean(options.enableLogging)), ("enable_archiving", .boolean(options.enableArchiving)),
            ("allow_voice_requests", .boolean(options.allowVoiceRequests)),
            ("occupants", .number(Double(room.occupants))), ("subject", .string(room.subject)),
        ])
    }

    static func occupantTable(_ occupant: MUCOccupantInfo, named name: String = "occupant") -> LuaTable {
        LuaTable(name, [("nick", .string(occupant.nick)), ("jid", .string(occupant.jid.description)), ("role", .string(occupant.role.rawValue)),
                        ("affiliation", .string(occupant.affiliation.rawValue))])
    }

    /// A configure handler's changes to `event.room`, applied to the options (other fields are read-only).
    static func apply(_ room: [String: LuaStoredValue], to options: MUCRoomOptions) -> MUCRoomOptions {
        var options = options
        func flag(_ key: String) -> Bool? { if case .boolean(let value)? = room[key] { return value } else { return nil } }
        func text(_ key: String) -> String? { if case .string(let value)? = room[key] { return value } else { return nil } }
        if let value = text("name") { options.name = value }
        if let value = text("description") { options.description = value }
        if let value = text("language") { options.language = value }
        if let value = flag("persistent") { options.persistent = value }
        if let value = flag("public") { options.isPublic = value }
        if let value = flag("members_only") { options.membersOnly = value }
        if let value = flag("moderated") { options.moderated = value }
        if let value = flag("password_protected") { options.passwordProtected = value }
        if let value = flag("non_anonymous") { options.nonAnonymous = value }
        if case .number(let value)? = room["max_occupants"], value >= 1, value < 1e9 { options.maxOccupants = Int(value) }
        if let value = flag("change_subject") { options.changeSubject = value }
        if let value = flag("allow_invites") { options.allowInvites = value }
        if let value = text("allow_private_messages").flatMap(MUCPrivateMessages.init(rawValue:)) { options.allowPrivateMessages = value }
        if let value = flag("enable_logging") { options.enableLogging = value }
        if let value = flag("enable_archiving") { options.enableArchiving = value }
        if let value = flag("allow_voice_requests") { options.allowVoiceRequests = value }
        return options
    }
}

private extension HookResult {
    /// Events whose "modify" adjusts fields rather than a stanza go on as "pass".
    var notModifying: HookResult {
        if case .modify = self { return .pass }
        return self
    }
}
