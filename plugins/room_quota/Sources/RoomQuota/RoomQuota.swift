import StarlingAPI

/// A MUC policy: each user may own at most `max_rooms` rooms of a MUC service (service admins are
/// exempt). It needs nothing but the `muc-room-create` hook point: the MUC module says how many rooms
/// the creator owns already.
public final class RoomQuotaModule: ServerModule {
    public static let descriptor = ModuleDescriptor(
        name: "room_quota", summary: "Caps how many MUC rooms one user may own.",
        options: [
            ModuleOptionSpec("max_rooms", .integer(0...100_000), default: .integer(3), doc: "Rooms one user may own on each MUC service."),
            ModuleOptionSpec("exempt", .stringList, default: .stringList([]), doc: "Users (bare JIDs) the cap does not apply to."),
        ]
    )

    private let maxRooms: Int
    private let exempt: Set<JID>

    public init(host: any ModuleHost) throws {
        maxRooms = host.options.integer("max_rooms")
        exempt = Set(try host.options.stringList("exempt").map { text in
            guard let jid = JID(text) else { throw ModuleStartError("room_quota: '\(text)' in exempt is not a JID") }
            return jid.bare
        })
    }

    public func register(_ registrar: ModuleRegistrar) {
        let (maxRooms, exempt) = (self.maxRooms, self.exempt)
        registrar.hook(.mucRoomCreate, priority: 100) { event in
            guard !exempt.contains(event.actor.bare), event.ownedRooms >= maxRooms else { return .pass }
            return .reject(.policyViolation, text: "you own \(event.ownedRooms) rooms already; the limit is \(maxRooms)")
        }
    }
}

@_cdecl("starling_plugin_api_version")
public func starlingPluginAPIVersion() -> Int { StarlingAPIVersion.compiledAPI }

@_cdecl("starling_plugin_module")
public func starlingPluginModule() -> UnsafeMutableRawPointer { StarlingPlugin.export(RoomQuotaModule.self) }
