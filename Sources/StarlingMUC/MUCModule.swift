import StarlingAPI
import StarlingMAM
import StarlingStorage

/// The `muc` module: a multi-user chat service (XEP-0045) per host at its own domain, with rooms that
/// policy hooks (Lua scripts, plugins) can steer at every decision.
public final class MUCModule: ServerModule, StatusReportingModule, ActivatableModule {
    public static let descriptor = ModuleDescriptor(
        name: "muc", summary: "Multi-user chat rooms at conference.<host>, with policy hooks.",
        xeps: ["XEP-0045", "XEP-0249", "XEP-0313", "XEP-0359", "XEP-0410", "XEP-0421"],
        options: [
            ModuleOptionSpec("domain", .string(choices: nil), default: .string("conference.@HOST@"), doc: "The service's domain; @HOST@ stands for the host."),
            ModuleOptionSpec("name", .string(choices: nil), default: .string("Chatrooms"), doc: "The service's name in service discovery."),
            ModuleOptionSpec("room_creation", .string(choices: RoomCreation.allCases.map(\.rawValue)), default: .string("local"),
                             doc: "Who may create rooms: anyone, local (users of this server), listed (room_creators), admins."),
            ModuleOptionSpec("access_create", .accessRule, default: .string("all"),
                             doc: "An access rule the creator must also pass (besides room_creation); the service's admins always may."),
            ModuleOptionSpec("room_creators", .stringList, default: .stringList([]), doc: "JIDs and domains that may create rooms when room_creation is listed."),
            ModuleOptionSpec("admins", .stringList, default: .stringList([]), doc: "JIDs that own every room of the service (they may configure, moderate and destroy any room)."),
            ModuleOptionSpec("max_rooms", .integer(1...10_000_000), default: .integer(10_000), doc: "Rooms the service holds at most (persistent ones included)."),
            ModuleOptionSpec("max_occupants", .integer(1...100_000), default: .integer(200), doc: "Occupants per room at most (a room's own maximum can only be lower)."),
            ModuleOptionSpec("max_rooms_per_session", .integer(1...10_000), default: .integer(100), doc: "Rooms one client session may be in at once."),
            ModuleOptionSpec("history_size", .integer(0...1_000), default: .integer(20), doc: "Messages of discussion history each room keeps for newcomers."),
            ModuleOptionSpec("max_nick_length", .integer(1...1_023), default: .integer(64), doc: "Longest nickname, in characters."),
            ModuleOptionSpec("max_subject_length", .integer(0...65_536), default: .integer(1_024), doc: "Longest room subject, in characters."),
            ModuleOptionSpec("message_rate", .number(0.01...100_000), default: .number(5), doc: "Messages (and presence changes) per second each occupant may send, on average."),
            ModuleOptionSpec("message_burst", .integer(1...100_000), default: .integer(10), doc: "Messages an occupant may send at once before message_rate applies."),
            ModuleOptionSpec("archiving", .boolean, default: .boolean(true),
                             doc: "Persistent rooms whose configuration enables it (muc#roomconfig_enablearchiving) keep a message archive (XEP-0313)."),
            ModuleOptionSpec("lock_new_rooms", .boolean, default: .boolean(true),
                             doc: "A new room is locked until its owner configures it (or accepts the defaults), as XEP-0045 asks."),
            ModuleOptionSpec("default_persistent", .boolean, default: .boolean(false), doc: "New rooms are persistent."),
            ModuleOptionSpec("default_public", .boolean, default: .boolean(true), doc: "New rooms are listed in service discovery."),
            ModuleOptionSpec("default_members_only", .boolean, default: .boolean(false), doc: "New rooms are members-only."),
            ModuleOptionSpec("default_moderated", .boolean, default: .boolean(false), doc: "New rooms are moderated."),
            ModuleOptionSpec("default_non_anonymous", .boolean, default: .boolean(false), doc: "New rooms show occupants' real JIDs to everyone."),
        ]
    )

    let service: MUCService
    private let settings: ServiceSettings
    private let host: any ModuleHost
    private let hooks: HostHooks

    public init(host: any ModuleHost) throws {
        let options = host.options
        var settings = ServiceSettings(domain: options.string("domain").replacingOccurrences(of: "@HOST@", with: host.domain))
        guard let domain = JID(settings.domain), domain.localpart == nil, domain.resourcepart == nil else {
            throw ModuleStartError("muc: '\(settings.domain)' is not a domain")
        }
        settings.domain = domain.domainpart
        guard settings.domain != host.domain else { throw ModuleStartError("muc: the service needs a domain of its own, not \(host.domain)") }
        settings.name = options.string("name")
        settings.creation = RoomCreation(rawValue: options.string("room_creation")) ?? .local
        settings.createAccess = options.string("access_create")
        settings.creators = Set(try options.stringList("room_creators").map { try Self.jid($0, option: "room_creators") })
        settings.maxRooms = options.integer("max_rooms")
        settings.maxRoomsPerSession = options.integer("max_rooms_per_session")
        settings.lockNewRooms = options.boolean("lock_new_rooms")
        settings.defaults.persistent = options.boolean("default_persistent")
        settings.defaults.isPublic = options.boolean("default_public")
        settings.defaults.membersOnly = options.boolean("default_members_only")
        settings.defaults.moderated = options.boolean("default_moderated")
        settings.defaults.nonAnonymous = options.boolean("default_non_anonymous")
        settings.defaults.maxOccupants = options.integer("max_occupants")
        settings.room.maxOccupants = options.integer("max_occupants")
        settings.room.historySize = options.integer("history_size")
        settings.room.maxNickLength = options.integer("max_nick_length")
        settings.room.maxSubjectLength = options.integer("max_subject_length")
        settings.room.messageRate = options.number("message_rate")
        settings.room.messageBurst = Double(options.integer("message_burst"))
        settings.room.serviceAdmins = Set(try options.stringList("admins").map { try Self.jid($0, option: "admins") })
        settings.room.archiving = options.boolean("archiving") && host.service((any ArchiveStore).self) != nil
        hooks = HostHooks(host: host)
        self.host = host
        self.settings = settings
        service = MUCService.claim(settings: settings, host: host, hooks: hooks, store: host.service((any MUCStore).self),
                                   archives: host.service((any ArchiveStore).self))
    }

    /// A reload with new options hands the running service, rooms and occupants included, to the new
    /// instance; a reload that disables the module stops it, and occupants hear so (332).
    public func activated() {
        service.activate(settings: settings, host: host, hooks: hooks)
    }

    public func deactivated() {
        service.retire()
    }

    private static func jid(_ text: String, option: String) throws -> JID {
        guard let jid = JID(text) else { throw ModuleStartError("muc: \(option) lists '\(text)', which is not a JID") }
        return jid.bare
    }

    public func register(_ registrar: ModuleRegistrar) {
        let service = self.service
        registrar.component(settings.domain, name: settings.name) { service.receive($0) }
        // Registered late (low priority): occupants leave after everything else heard of the session's end.
        registrar.hook(.sessionClosed, priority: -100) { event in
            service.sessionClosed(event.jid)
            return .pass
        }
        registrar.hook(.serverStopping) { _ in
            service.shutdown()
            return .pass
        }
        // In a cluster one node at a time serves the service (see `ComponentEvent`).
        let domain = settings.domain
        registrar.hook(.componentClaimed) { event in
            if event.domain == domain { service.servingAgain() }
            return .pass
        }
        registrar.hook(.componentReleased) { event in
            if event.domain == domain { service.released() }
            return .pass
        }
        // Occupants whose node was lost leave, as if their sessions had closed.
        registrar.hook(.clusterSessionsChanged) { event in
            for resource in event.lost { service.sessionClosed(resource.jid) }
            return .pass
        }
        registrar.hook(.serverDraining) { event in
            event.finish { await service.drainArchives() }
            return .pass
        }
        registrar.adminCommand("list-rooms", doc: "Every room of the service: name, JID, title, occupants, public, persistent.") { _ throws(AdminCommandError) in
            try service.adminRoomList()
        }
        registrar.adminCommand("create-room", doc: "Create a room: name, owner (a JID), optional title, public, persistent (default true).") { arguments throws(AdminCommandError) in
            try service.adminCreateRoom(arguments)
        }
        registrar.adminCommand("destroy-room", doc: "Destroy a room: name, optional reason (its occupants hear it).") { arguments throws(AdminCommandError) in
            try await service.adminDestroyRoom(arguments)
        }
    }

    public var statusCounters: [String: Int] {
        service.archiveCounters.merging(["rooms": service.liveRooms, "pending_writes": service.pendingWrites]) { $1 }
    }
}
