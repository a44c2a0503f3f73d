import StarlingAPI
import StarlingStorage

/// Moderator, admin and owner use cases (XEP-0045 §8–10): `muc#admin` role and affiliation lists,
/// `muc#owner` configuration and destruction, and registration with a room (§7.10).
extension Room {
    // MARK: muc#admin

    func adminGet(_ input: ComponentStanza, payload: XMLElement) {
        guard let request = payload.child("item", namespace: MUCNamespace.admin) else { return refuse(input, .badRequest) }
        let requester = sessions[input.from].flatMap { occupants[$0] }
        let requesterAffiliation = affiliation(of: input.from)
        var query = XMLElement(name: "query", namespace: MUCNamespace.admin)
        if let roleText = request[attribute: "role"] {
            guard let role = MUCRole(rawValue: roleText), role != .none else { return refuse(input, .badRequest) }
            guard requester?.role == .moderator else { return refuse(input, .forbidden, text: "only moderators may read role lists") }
            for occupant in sortedOccupants() where occupant.role == role {
                var item = item(for: occupant, jidVisible: true)
                item[attribute: "nick"] = occupant.nick
                query.append(item)
            }
        } else if let affiliationText = request[attribute: "affiliation"] {
            guard let wanted = MUCAffiliation(rawValue: affiliationText), wanted != .none else { return refuse(input, .badRequest) }
            let allowed: Bool
            switch wanted {
            case .outcast: allowed = requesterAffiliation.rank >= MUCAffiliation.admin.rank
            case .member:
                allowed = requesterAffiliation.rank >= MUCAffiliation.admin.rank
                    || (requester.map { options.getMemberList.contains($0.role) } ?? false)
                    || (options.nonAnonymous && requesterAffiliation == .member)
            case .admin, .owner:
                allowed = requesterAffiliation == .owner || (options.nonAnonymous && requesterAffiliation.rank >= MUCAffiliation.admin.rank)
            case .none: allowed = false
            }
            guard allowed else { return refuse(input, .forbidden, text: "you may not read that list") }
            for (user, record) in affiliations.sorted(by: { $0.key.description < $1.key.description }) where record.affiliation == wanted {
                var item = XMLElement(name: "item", namespace: MUCNamespace.admin, attributes: ["affiliation": wanted.rawValue, "jid": user.description])
                if let nick = record.nick, wanted != .outcast { item[attribute: "nick"] = nick }
                if let reason = record.reason { item.append(XMLElement(name: "reason", namespace: MUCNamespace.admin).with(text: reason)) }
                query.append(item)
            }
        } else {
            return refuse(input, .badRequest)
        }
        send(result(input, query))
    }

    private enum Change {
        case role(nick: String, MUCRole, reason: String?)
        case affiliation(JID, MUCAffiliation, nick: String?, reason: String?)
    }

    /// Role and affiliation changes: every item is checked before any is applied (§9.2: all or none).
    func adminSet(_ input: ComponentStanza, payload: XMLElement) {
        let items = payload.elements.filter { $0.name == "item" && $0.namespace == MUCNamespace.admin }
        guard !items.isEmpty else { return refuse(input, .badRequest) }
        let requester = sessions[input.from].flatMap { occupants[$0] }
        let requesterAffiliation = affiliation(of: input.from)
        var changes: [Change] = []
        var ownersAfter = owners
        for item in items {
            let reason = item.child("reason", namespace: MUCNamespace.admin)?.text
            let roleText = item[attribute: "role"]
            let affiliationText = item[attribute: "affiliation"]
            if roleText != nil && affiliationText != nil { return refuse(input, .badRequest, text: "an item changes a role or an affiliation, not both") }
            if let roleText {
                guard let role = MUCRole(rawValue: roleText), let nick = item[attribute: "nick"] else { return refuse(input, .badRequest) }
                guard let requester, requester.role == .moderator else { return refuse(input, .forbidden, text: "only moderators may change roles") }
                guard let target = occupants[nick] else { return refuse(input, .itemNotFound, text: "no occupant with that nickname") }
                let targetAffiliation = affiliation(of: target.user)
                switch role {
                case .none:
                    if target.nick == requester.nick { return refuse(input, .conflict, text: "you cannot kick yourself") }
                    if targetAffiliation.rank > requesterAffiliation.rank || targetAffiliation.rank >= MUCAffiliation.admin.rank && targetAffiliation.rank >= requesterAffiliation.rank {
                        return refuse(input, .notAllowed, text: "you cannot kick someone with a higher affiliation")
                    }
                case .visitor:
                    if targetAffiliation.rank >= MUCAffiliation.admin.rank || targetAffiliation.rank >= requesterAffiliation.rank && target.nick != requester.nick {
                        return refuse(input, .notAllowed, text: "you cannot revoke voice from that occupant")
                    }
                case .participant:
                    if target.role == .moderator {
                        guard requesterAffiliation.rank >= MUCAffiliation.admin.rank else { return refuse(input, .forbidden, text: "only admins may revoke moderator status") }
                        if targetAffiliation.rank >= MUCAffiliation.admin.rank { return refuse(input, .notAllowed, text: "admins and owners stay moderators") }
                    }
                case .moderator:
                    guard requesterAffiliation.rank >= MUCAffiliation.admin.rank else { return refuse(input, .forbidden, text: "only admins may grant moderator status") }
                }
                changes.append(.role(nick: nick, role, reason: reason))
            } else if let affiliationText {
                guard let wanted = MUCAffiliation(rawValue: affiliationText), let target = item[attribute: "jid"].flatMap({ JID($0)?.bare }) else {
                    return refuse(input, .badRequest)
                }
                guard requesterAffiliation.rank >= MUCAffiliation.admin.rank else { return refuse(input, .forbidden, text: "only admins may change affiliations") }
                let current = affiliations[target]?.affiliation ?? .none
                if wanted == .outcast && target == input.from.bare { return refuse(input, .conflict, text: "you cannot ban yourself") }
                if wanted.rank >= MUCAffiliation.admin.rank && wanted != .outcast || current.rank >= MUCAffiliation.admin.rank {
                    guard requesterAffiliation == .owner else { return refuse(input, .forbidden, text: "only owners may change admins and owners") }
                }
                if current == .owner && wanted != .owner { ownersAfter.remove(target) }
                if wanted == .owner { ownersAfter.insert(target) }
                changes.append(.affiliation(target, wanted, nick: item[attribute: "nick"], reason: reason))
            } else {
                return refuse(input, .badRequest)
            }
        }
        if ownersAfter.isEmpty { return refuse(input, .conflict, text: "a room needs at least one owner") }
        // Policy hooks see each change once the room has found it allowed.
        for change in changes {
            let event: MUCModerationEvent
            switch change {
            case .role(let nick, let role, let reason):
                event = MUCModerationEvent(room: info, action: role == .none ? .kick : .role, actor: input.from, targetNick: nick,
                                           targetJID: nil, role: role, affiliation: nil, reason: reason)
            case .affiliation(let user, let affiliation, _, let reason):
                event = MUCModerationEvent(room: info, action: affiliation == .outcast ? .ban : .affiliation, actor: input.from, targetNick: nil,
                                           targetJID: user, role: nil, affiliation: affiliation, reason: reason)
            }
            switch hooks.run(.mucModeration, event) {
            case .pass, .modify: continue
            case .handled: return refuse(input, .notAllowed, text: "refused by the room's policy")
            case .reject(let condition, let text): return refuse(input, condition, text: text)
            case .refuse(let error): return refuse(input, error)
            }
        }
        let actor = requester?.nick
        for change in changes {
            switch change {
            case .role(let nick, let role, let reason):
                applyRole(role, to: nick, actor: actor, reason: reason)
            case .affiliation(let user, let affiliation, let nick, let reason):
                setAffiliation(user, affiliation, nick: nick.map { $0.isEmpty ? .clear : .set($0) } ?? .keep, reason: reason)
                applyAffiliationChange(to: user, actor: actor, reason: reason)
            }
        }
        send(result(input, nil))
        closeIfAbandoned()
    }

    // MARK: muc#owner

    func ownerGet(_ input: ComponentStanza) {
        guard affiliation(of: input.from) == .owner else { return refuse(input, .forbidden, text: "only owners may configure the room") }
        var query = XMLElement(name: "query", namespace: MUCNamespace.owner)
        let admins = affiliations.filter { $0.value.affiliation == .admin }.keys.sorted { $0.description < $1.description }
        query.append(RoomConfigForm.form(options, owners: owners.sorted { $0.description < $1.description }, admins: admins,
                                         serviceMaximum: settings.maxOccupants).element)
        send(result(input, query))
    }

    func ownerSet(_ input: ComponentStanza, payload: XMLElement) {
        guard affiliation(of: input.from) == .owner else { return refuse(input, .forbidden, text: "only owners may configure or destroy the room") }
        if let destroy = payload.child("destroy", namespace: MUCNamespace.owner) {
            return self.destroy(input, destroy: destroy)
        }
        guard let form = DataForm.first(in: payload) else { return refuse(input, .badRequest) }
        switch form.type {
        case .cancel:
            // Cancelling the first configuration destroys the new room (§10.1.3); later, nothing changes.
            if locked { return self.destroy(input, destroy: XMLElement(name: "destroy", namespace: MUCNamespace.owner)) }
            send(result(input, nil))
        case .submit:
            configure(input, form: form)
        case .form, .result:
            refuse(input, .badRequest)
        }
    }

    private func configure(_ input: ComponentStanza, form: DataForm) {
        let wasLocked = locked
        let before = options
        var submission = RoomConfigForm.Submission(options: options)
        // An empty submission accepts the defaults: an instant room (§10.1.2).
        if !form.fields.isEmpty {
            switch RoomConfigForm.apply(form, to: options, serviceMaximum: settings.maxOccupants) {
            case .success(let applied): submission = applied
            case .failure(let error): return refuse(input, .notAcceptable, text: error.message)
            }
        }
        let adjusted = Adjustable(submission.options)
        switch hooks.run(.mucRoomConfigure, MUCConfigureEvent(room: info, actor: input.from, options: adjusted)) {
        case .pass, .modify: break
        case .handled: return refuse(input, .notAllowed, text: "refused by the room's policy")
        case .reject(let condition, let text): return refuse(input, condition, text: text)
        case .refuse(let error): return refuse(input, error)
        }
        if let owners = submission.owners, owners.isEmpty { return refuse(input, .notAcceptable, text: "a room needs at least one owner") }
        var new = adjusted.value
        new.maxOccupants = max(1, min(new.maxOccupants, settings.maxOccupants))
        options = new
        locked = false
        // Full lists of owners and admins replace the stored ones.
        var touched: [JID] = []
        if let owners = submission.owners {
            for user in owners where affiliations[user]?.affiliation != .owner { setAffiliation(user, .owner, reason: nil); touched.append(user) }
            for user in self.owners where !owners.contains(user) { setAffiliation(user, .none, reason: nil); touched.append(user) }
        }
        if let admins = submission.admins {
            for user in admins where affiliations[user]?.affiliation != .admin && affiliations[user]?.affiliation != .owner {
                setAffiliation(user, .admin, reason: nil)
                touched.append(user)
            }
            for (user, record) in affiliations where record.affiliation == .admin && !admins.contains(user) {
                setAffiliation(user, .none, reason: nil)
                touched.append(user)
            }
        }
        for user in touched { applyAffiliationChange(to: user, actor: nil, reason: nil) }
        // A room turned members-only loses its non-members (322).
        if new.membersOnly && !before.membersOnly {
            for occupant in sortedOccupants() where affiliation(of: occupant.user).rank < MUCAffiliation.member.rank {
                removeOccupant(occupant, codes: [322])
            }
        }
        // Stored state follows persistence.
        if new.persistent && (!before.persistent || wasLocked) {
            output.append(.store(.all(stored)))
        } else if before.persistent && !new.persistent && !wasLocked {
            output.append(.store(.delete))
        } else if new.persistent {
            output.append(.store(.options(stored)))
        }
        send(result(input, nil))
        if !wasLocked {
            var codes: [Int] = []
            if new.enableLogging != before.enableLogging { codes.append(new.enableLogging ? 170 : 171) }
            if new.nonAnonymous != before.nonAnonymous { codes.append(new.nonAnonymous ? 172 : 173) }
            if codes.isEmpty && new != before { codes.append(104) }
            if !codes.isEmpty {
                var message = XMLElement(name: "message", namespace: Namespace.client, attributes: [
                    "from": jid.description, "type": "groupchat", "id": StanzaID.next(),
                ])
                message.append(userX(statuses: codes))
                output.append(.broadcast(message, allSessions))
            }
        }
        closeIfAbandoned()
    }

    /// The owner destroys the room (§10.9): each occupant gets one unavailable presence with `<destroy/>`.
    private func destroy(_ input: ComponentStanza, destroy: XMLElement) {
        switch hooks.run(.mucRoomDestroy, MUCRoomEvent(room: info, actor: input.from, nick: nil, ownedRooms: 0)) {
        case .pass, .modify: break
        case .handled: return refuse(input, .notAllowed, text: "refused by the room's policy")
        case .reject(let condition, let text): return refuse(input, condition, text: text)
        case .refuse(let error): return refuse(input, error)
        }
        var announcement = XMLElement(name: "destroy", namespace: MUCNamespace.user)
        if let alternate = destroy[attribute: "jid"] { announcement[attribute: "jid"] = alternate }
        if let reason = destroy.child("reason") { announcement.append(XMLElement(name: "reason", namespace: MUCNamespace.user).with(text: reason.text)) }
        if let password = destroy.child("password") { announcement.append(XMLElement(name: "password", namespace: MUCNamespace.user).with(text: password.text)) }
        close(announcing: announcement)
        send(result(input, nil))
    }

    /// The server's administrator destroys the room (the admin API): as an owner's `<destroy/>`, without
    /// the room's policy hook, since the operator is above the room's policy.
    func destroyedByAdministrator(reason: String?) -> [RoomAction] {
        output = []
        var announcement = XMLElement(name: "destroy", namespace: MUCNamespace.user)
        if let reason { announcement.append(XMLElement(name: "reason", namespace: MUCNamespace.user).with(text: reason)) }
        close(announcing: announcement)
        return takeOutput()
    }

    /// Every occupant gets one unavailable presence carrying `announcement`; the room and its record go.
    private func close(announcing announcement: XMLElement) {
        for occupant in sortedOccupants() {
            for session in occupant.sessions.keys {
                var presence = unavailable(from: occupant, to: session)
                var x = userX(item: XMLElement(name: "item", namespace: MUCNamespace.user, attributes: ["affiliation": "none", "role": "none"]),
                              statuses: [110])
                x.append(announcement)
                presence.append(x)
                send(presence)
                output.append(.left(session))
            }
        }
        occupants = [:]
        sessions = [:]
        if options.persistent { output.append(.store(.delete)) }
        output.append(.closed)
    }

    // MARK: Registration (§7.10)

    func registrationGet(_ input: ComponentStanza) {
        let user = input.from.bare
        let affiliation = affiliation(of: user)
        if affiliation == .outcast { return refuse(input, .forbidden, text: "you are banned from this room") }
        var query = XMLElement(name: "query", namespace: MUCNamespace.iqRegister)
        if affiliation.rank >= MUCAffiliation.member.rank, let nick = affiliations[user]?.nick {
            query.append(XMLElement(name: "registered", namespace: MUCNamespace.iqRegister))
            query.append(XMLElement(name: "username", namespace: MUCNamespace.iqRegister).with(text: nick))
            return send(result(input, query))
        }
        if options.membersOnly && affiliation.rank < MUCAffiliation.member.rank {
            return refuse(input, .notAllowed, text: "this room's admins add its members")
        }
        query.append(XMLElement(name: "instructions", namespace: MUCNamespace.iqRegister).with(text: "Choose the nickname to reserve in this room."))
        query.append(DataForm(type: .form, formType: MUCNamespace.register, title: "Register with \(jid)", fields: [
            DataForm.Field("muc#register_roomnick", type: "text-single", label: "Nickname", required: true),
        ]).element)
        send(result(input, query))
    }

    func registrationSet(_ input: ComponentStanza, payload: XMLElement) {
        let user = input.from.bare
        let current = affiliation(of: user)
        if current == .outcast { return refuse(input, .forbidden, text: "you are banned from this room") }
        if payload.child("remove", namespace: MUCNamespace.iqRegister) != nil {
            guard affiliations[user] != nil else { return refuse(input, .itemNotFound, text: "you are not registered with this room") }
            if current == .owner && owners.count == 1 { return refuse(input, .conflict, text: "the last owner cannot leave the room's affiliations") }
            setAffiliation(user, .none, reason: nil)
            applyAffiliationChange(to: user, actor: nil, reason: nil)
            send(result(input, nil))
            return closeIfAbandoned()
        }
        guard let form = DataForm.first(in: payload), form.type == .submit, form.formType == MUCNamespace.register,
              let nick = form["muc#register_roomnick"]?.value, !nick.isEmpty, (try? JID(localpart: nil, domainpart: "x", resourcepart: nick)) != nil else {
            return refuse(input, .badRequest, text: "submit the registration form with a nickname")
        }
        guard validNick(nick) else { return refuse(input, .notAcceptable, text: "that nickname is not allowed here") }
        if nickTaken(nick, by: user) { return refuse(input, .conflict, text: "that nickname is reserved or in use") }
        if options.membersOnly && current.rank < MUCAffiliation.member.rank {
            return refuse(input, .notAllowed, text: "this room's admins add its members")
        }
        setAffiliation(user, current.rank >= MUCAffiliation.member.rank ? (affiliations[user]?.affiliation ?? current) : .member, nick: .set(nick), reason: nil)
        applyAffiliationChange(to: user, actor: nil, reason: nil)
        send(result(input, nil))
    }
}
