import StarlingAPI

/// The `muc#roomconfig` form (XEP-0045 §10.2, §15.5.3) for a room's options, and reading a submitted one.
enum RoomConfigForm {
    static let maxUsersChoices = [10, 20, 30, 50, 100, 200, 500, 1000]

    static func form(_ options: MUCRoomOptions, owners: [JID], admins: [JID], serviceMaximum: Int) -> DataForm {
        func boolean(_ variable: String, _ label: String, _ value: Bool) -> DataForm.Field {
            DataForm.Field(variable, type: "boolean", label: label, values: [value ? "1" : "0"])
        }
        let roles = MUCRole.allCases.filter { $0 != .none }.map { DataForm.Option($0.rawValue, label: $0.rawValue.capitalized) }
        var choices = maxUsersChoices.filter { $0 <= serviceMaximum }
        if !choices.contains(options.maxOccupants) { choices.append(options.maxOccupants) }
        return DataForm(type: .form, formType: MUCNamespace.roomConfig, title: "Room configuration", fields: [
            DataForm.Field("muc#roomconfig_roomname", type: "text-single", label: "Room name", values: [options.name]),
            DataForm.Field("muc#roomconfig_roomdesc", type: "text-single", label: "Description", values: [options.description]),
            DataForm.Field("muc#roomconfig_lang", type: "text-single", label: "Language of the discussion", values: [options.language]),
            boolean("muc#roomconfig_persistentroom", "Keep the room when the last occupant leaves", options.persistent),
            boolean("muc#roomconfig_publicroom", "List the room publicly", options.isPublic),
            boolean("muc#roomconfig_membersonly", "Only members may enter", options.membersOnly),
            boolean("muc#roomconfig_moderatedroom", "Only participants (not visitors) may speak", options.moderated),
            boolean("muc#roomconfig_passwordprotectedroom", "A password is needed to enter", options.passwordProtected),
            DataForm.Field("muc#roomconfig_roomsecret", type: "text-private", label: "Password", values: [options.password]),
            DataForm.Field("muc#roomconfig_whois", type: "list-single", label: "Who may see occupants' real addresses",
                           values: [options.nonAnonymous ? "anyone" : "moderators"],
                           options: [DataForm.Option("moderators", label: "Moderators only"), DataForm.Option("anyone", label: "Anyone")]),
            DataForm.Field("muc#roomconfig_maxusers", type: "list-single", label: "Maximum number of occupants",
                           values: [String(options.maxOccupants)], options: choices.sorted().map { DataForm.Option(String($0)) }),
            boolean("muc#roomconfig_changesubject", "Participants may change the subject", options.changeSubject),
            boolean("muc#roomconfig_allowinvites", "Members may invite others", options.allowInvites),
            DataForm.Field("muc#roomconfig_allowpm", type: "list-single", label: "Who may send private messages",
                           values: [options.allowPrivateMessages.rawValue],
                           options: MUCPrivateMessages.allCases.map { DataForm.Option($0.rawValue, label: $0.rawValue.capitalized) }),
            DataForm.Field("muc#roomconfig_presencebroadcast", type: "list-multi", label: "Roles whose presence is broadcast",
                           values: options.presenceBroadcast.map(\.rawValue), options: roles),
            DataForm.Field("muc#roomconfig_getmemberlist", type: "list-multi", label: "Roles that may see the member list",
                           values: options.getMemberList.map(\.rawValue), options: roles),
            boolean("muc#roomconfig_enablelogging", "The discussion is logged publicly", options.enableLogging),
            boolean("muc#roomconfig_enablearchiving", "Keep the discussion in the room's archive", options.enableArchiving),
            boolean("muc#roomconfig_allowvoicerequests", "Visitors may ask for voice", options.allowVoiceRequests),
            DataForm.Field("muc#roomconfig_roomadmins", type: "jid-multi", label: "Room admins", values: admins.map(\.description)),
            DataForm.Field("muc#roomconfig_roomowners", type: "jid-multi", label: "Room owners", values: owners.map(\.description)),
        ])
    }

    struct Submission {
        var options: MUCRoomOptions
        /// Full lists when the form had those fields.
        var owners: [JID]?
        var admins: [JID]?
    }

    /// Applies a submitted form to `options`: fields not given keep their value, unknown fields are
    /// ignored (XEP-0004 allows a service to), and a value the field cannot take is an error.
    static func apply(_ form: DataForm, to options: MUCRoomOptions, serviceMaximum: Int) -> Result<Submission, FormError> {
        var options = options
        var owners: [JID]?
        var admins: [JID]?
        for field in form.fields {
            guard let variable = field.variable else { continue }
            let value = field.value ?? ""
            func boolean() throws(FormError) -> Bool {
                switch value {
                case "1", "true": return true
                case "0", "false": return false
                default: throw FormError("\(variable) must be a boolean, not '\(value)'")
                }
            }
            func roles() throws(FormError) -> [MUCRole] {
                try field.values.map { text throws(FormError) -> MUCRole in
                    guard let role = MUCRole(rawValue: text), role != .none else { throw FormError("\(variable): '\(text)' is not a role") }
                    return role
                }
            }
            func jids() throws(FormError) -> [JID] {
                try field.values.filter { !$0.isEmpty }.map { text throws(FormError) -> JID in
                    guard let jid = JID(text) else { throw FormError("\(variable): '\(text)' is not a JID") }
                    return jid.bare
                }
            }
            do throws(FormError) {
                switch variable {
                case "muc#roomconfig_roomname": options.name = value
                case "muc#roomconfig_roomdesc": options.description = value
                case "muc#roomconfig_lang": options.language = value
                case "muc#roomconfig_persistentroom": options.persistent = try boolean()
                case "muc#roomconfig_publicroom": options.isPublic = try boolean()
                case "muc#roomconfig_membersonly": options.membersOnly = try boolean()
                case "muc#roomconfig_moderatedroom": options.moderated = try boolean()
                case "muc#roomconfig_passwordprotectedroom": options.passwordProtected = try boolean()
                case "muc#roomconfig_roomsecret": options.password = value
                case "muc#roomconfig_whois":
                    guard value == "anyone" || value == "moderators" else { throw FormError("muc#roomconfig_whois must be anyone or moderators") }
                    options.nonAnonymous = value == "anyone"
                case "muc#roomconfig_maxusers":
                    if value == "none" || value.isEmpty {
                        options.maxOccupants = serviceMaximum
                    } else if let number = Int(value), number > 0 {
                        options.maxOccupants = min(number, serviceMaximum)
                    } else {
                        throw FormError("muc#roomconfig_maxusers must be a positive number or none")
                    }
                case "muc#roomconfig_changesubject": options.changeSubject = try boolean()
                case "muc#roomconfig_allowinvites": options.allowInvites = try boolean()
                case "muc#roomconfig_allowpm":
                    guard let who = MUCPrivateMessages(rawValue: value) else { throw FormError("muc#roomconfig_allowpm: '\(value)' is not a choice") }
                    options.allowPrivateMessages = who
                case "muc#roomconfig_presencebroadcast": options.presenceBroadcast = try roles()
                case "muc#roomconfig_getmemberlist": options.getMemberList = try roles()
                case "muc#roomconfig_enablelogging": options.enableLogging = try boolean()
                case "muc#roomconfig_enablearchiving", "mam": options.enableArchiving = try boolean()
                case "muc#roomconfig_allowvoicerequests": options.allowVoiceRequests = try boolean()
                case "muc#roomconfig_roomadmins": admins = try jids()
                case "muc#roomconfig_roomowners": owners = try jids()
                default: continue
                }
            } catch {
                return .failure(error)
            }
        }
        if options.passwordProtected && options.password.isEmpty {
            return .failure(FormError("a password-protected room needs a password"))
        }
        return .success(Submission(options: options, owners: owners, admins: admins))
    }
}

struct FormError: Error, Equatable {
    let message: String
    init(_ message: String) { self.message = message }
}
