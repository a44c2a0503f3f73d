import Foundation
import StarlingAPI
import StarlingMAM
import StarlingStorage
import Synchronization

/// Who may create rooms.
enum RoomCreation: String, CaseIterable {
    /// Any user (of any server, once federation exists).
    case anyone
    /// Users of this server's hosts.
    case local
    /// Users and domains listed in `room_creators`.
    case listed
    /// Only the service's admins.
    case admins
}

/// The service-level settings (module options, read once).
struct ServiceSettings {
    var domain: String
    var name = "Chatrooms"
    var creation = RoomCreation.local
    var creators: Set<JID> = []
    /// The access rule a creator must pass too (`access_create`).
    var createAccess = "all"
    var maxRooms = 10_000
    var maxRoomsPerSession = 100
    var lockNewRooms = true
    var defaults = MUCRoomOptions()
    var room = RoomSettings()
}

/// One live room and the serial line its work runs on.
final class RoomHandle: @unchecked Sendable {
    let room: Room
    let mailbox: Mailbox
    /// Touched only by work running in `mailbox`.
    var closed = false
    var owners: Set<JID>
    /// What disco#items on the service and the admin API's room list show, readable from any thread.
    let listing: Mutex<RoomListing>

    init(room: Room) {
        self.room = room
        mailbox = Mailbox()
        owners = room.owners
        listing = Mutex(RoomListing(room))
    }
}

/// A room as listings show it.
struct RoomListing {
    /// In the service's disco#items: public and not locked.
    var listed: Bool
    var title: String
    var occupants: Int
    var persistent: Bool

    init(_ room: Room) {
        listed = room.options.isPublic && !room.locked
        title = room.options.name
        occupants = room.occupants.count
        persistent = room.options.persistent
    }
}

/// A MUC service at one domain: its rooms, who is in which, loading persistent rooms at start and
/// storing their changes, and carrying out what rooms decide. No lock is shared between rooms: each
/// room's work runs on its own mailbox, and rooms are found in a sharded table.
final class MUCService: @unchecked Sendable {
    /// Replaced when a reload gives the running service new options (see `running`).
    private let current: Mutex<(settings: ServiceSettings, host: any ModuleHost, hooks: any HookRunner)>
    var settings: ServiceSettings { current.withLock { $0.settings } }
    private var host: any ModuleHost { current.withLock { $0.host } }
    private var hooks: any HookRunner { current.withLock { $0.hooks } }
    private let store: (any MUCStore)?
    /// How many active module instances use this service (a reload briefly has two); guarded by `live`.
    private var users = 0
    private let rooms = ShardedDictionary<String, RoomHandle>()
    private let roomCount = Atomic<Int>(0)
    /// Session (real full JID) → the rooms it is in, for leaving them all when it closes.
    private let sessionRooms = ShardedDictionary<JID, Set<String>>()
    /// Owner (bare JID) → rooms of this service it owns.
    private let ownerCounts = ShardedDictionary<JID, Int>()
    private let writes = KeyedSerialQueue()
    /// Until persistent rooms are loaded, stanzas wait here (a few) so none meets a room that is not
    /// there yet.
    private let loading = Mutex<(done: Bool, pending: [ComponentStanza])>((false, []))
    /// Set once loading is done: afterwards no stanza takes `loading`'s lock.
    private let loaded = Atomic<Bool>(false)
    /// False while another cluster node serves the domain (between `released()` and `servingAgain()`).
    private let serving = Atomic<Bool>(true)
    /// Counts loads of the stored rooms (see `start`).
    private let loadGeneration = Atomic<Int>(0)
    private static let maxPendingWhileLoading = 10_000

    /// Rooms' archives (XEP-0313), when storage offers them.
    private let archive: (store: any ArchiveStore, writer: ArchiveWriter, runner: ArchiveQueryRunner)?

    init(settings: ServiceSettings, host: any ModuleHost, hooks: any HookRunner, store: (any MUCStore)?, archives: (any ArchiveStore)?) {
        current = Mutex((settings, host, hooks))
        self.store = store
        domain = settings.domain
        archive = archives.map { archives in
            (archives, ArchiveWriter(store: archives, accounts: nil, host: host, name: "muc \(settings.domain)"),
             ArchiveQueryRunner(store: archives, pageSize: 50, maxPageSize: 250))
        }
    }

    let domain: String

    /// The services in this process, by domain: a module reloaded with new options takes over the
    /// running service (rooms, occupants and all) instead of starting an empty one.
    private static let live = Mutex<[String: MUCService]>([:])

    /// The service at `settings.domain`: the running one, or a new one that starts when activated.
    static func claim(settings: ServiceSettings, host: any ModuleHost, hooks: any HookRunner, store: (any MUCStore)?,
                      archives: (any ArchiveStore)?) -> MUCService {
        live.withLock { live in
            if let existing = live[settings.domain] { return existing }
            let created = MUCService(settings: settings, host: host, hooks: hooks, store: store, archives: archives)
            live[settings.domain] = created
            return created
        }
    }

    /// A module instance now serves with these options: the first one starts the service, a later one
    /// (a reload) gives every room the new options at its next turn.
    func activate(settings: ServiceSettings, host: any ModuleHost, hooks: any HookRunner) {
        let first = MUCService.live.withLock { _ in
            users += 1
            return users == 1
        }
        current.withLock { $0 = (settings, host, hooks) }
        if first { start() }
        for (_, handle) in rooms.snapshot() {
            handle.mailbox.submit {
                handle.room.settings = settings.room
                handle.room.hooks = hooks
            }
        }
    }

    /// A module instance stopped serving; the last one to go stops the service (occupants hear 332).
    func retire() {
        let last: Bool = MUCService.live.withLock { live in
            users -= 1
            guard users == 0 else { return false }
            if live[domain] === self { live[domain] = nil }
            return true
        }
        if last { shutdown() }
    }

    var liveRooms: Int { roomCount.load(ordering: .relaxed) }

    /// Loads the persistent rooms, retrying while the store fails (stanzas wait meanwhile, up to a bound).
    func start() {
        // A cluster claim reloads while the load from activation may still run: only the latest counts.
        let generation = loadGeneration.add(1, ordering: .relaxed).newValue
        guard let store else {
            finishLoading([], generation: generation)
            return
        }
        Task {
            var delay = 1.0
            while true {
                do {
                    let stored = try await store.mucRooms(service: settings.domain)
                    guard finishLoading(stored, generation: generation) else { return }
                    host.log(.info, "muc \(settings.domain): \(stored.count) persistent room(s) loaded")
                    return
                } catch {
                    host.log(.error, "muc \(settings.domain): cannot load the persistent rooms, retrying in \(Int(delay)) s: \(error)")
                    try? await Task.sleep(for: .seconds(delay))
                    delay = min(delay * 2, 30)
                }
            }
        }
    }

    /// This node (again) serves the domain for its cluster: another node may have served it since the
    /// rooms were loaded, so they are loaded afresh (stanzas wait meanwhile, as at start).
    func servingAgain() {
        serving.store(true, ordering: .releasing)
        loading.withLock { state in
            state.done = false
            loaded.store(false, ordering: .releasing)
        }
        for (name, handle) in rooms.snapshot() {
            rooms.removeValue(forKey: name)
            handle.mailbox.submit { handle.closed = true }
        }
        roomCount.store(0, ordering: .relaxed)
        for (owner, _) in ownerCounts.snapshot() { ownerCounts.removeValue(forKey: owner) }
        for (session, _) in sessionRooms.snapshot() { sessionRooms.removeValue(forKey: session) }
        start()
    }

    /// False (and nothing changed) when a later load has started meanwhile.
    @discardableResult
    private func finishLoading(_ stored: [StoredMUCRoom], generation: Int) -> Bool {
        guard generation == loadGeneration.load(ordering: .relaxed) else { return false }
        for entry in stored {
            let room = Room(stored: entry, settings: settings.room, hooks: hooks)
            rooms[entry.jid.localpart ?? ""] = RoomHandle(room: room)
            roomCount.add(1, ordering: .relaxed)
            for owner in room.owners { ownerCounts.withValue(for: owner) { $0 = ($0 ?? 0) + 1 } }
        }
        let pending = loading.withLock { state -> [ComponentStanza] in
            state.done = true
            loaded.store(true, ordering: .releasing)
            defer { state.pending = [] }
            return state.pending
        }
        for input in pending { receive(input) }
        return true
    }

    // MARK: Stanzas in

    /// Every stanza for the service's domain or a JID at it.
    func receive(_ input: ComponentStanza) {
        if !loaded.load(ordering: .acquiring) {
            let ready: Bool = loading.withLock { state in
                if state.done { return true }
                if state.pending.count < Self.maxPendingWhileLoading { state.pending.append(input) } else { return true }
                return false
            }
            guard ready else { return }
        }
        guard let name = input.to.localpart else { return serviceStanza(input) }
        if let handle = rooms[name] {
            submit(input, to: handle)
            return
        }
        guard input.stanza.name == "presence", input.stanza[attribute: "type"] == nil, let nick = input.to.resourcepart,
              input.stanza.child("x", namespace: MUCNamespace.muc) != nil else {
            return noSuchRoom(input)
        }
        create(name: name, for: input, nick: nick)
    }

    private func submit(_ input: ComponentStanza, to handle: RoomHandle) {
        if input.stanza.name == "presence", input.stanza[attribute: "type"] == nil, input.to.resourcepart != nil,
           let joined = sessionRooms[input.from], !joined.contains(handle.room.jid.localpart ?? ""), joined.count >= settings.maxRoomsPerSession {
            return refuse(input, .resourceConstraint, text: "you are in too many rooms already", type: "wait")
        }
        let accepted = handle.mailbox.submit { [self] in
            guard !handle.closed else {
                // The room went away while this waited: it meets whatever is there now.
                receive(input)
                return
            }
            carryOut(handle.room.handle(input, now: Date().timeIntervalSince1970), for: handle)
        }
        if !accepted { refuse(input, .resourceConstraint, text: "the room is too busy, try again", type: "wait") }
    }

    /// The first join of a room that does not exist creates it, if the user may.
    private func create(name: String, for input: ComponentStanza, nick: String) {
        let creator = input.from.bare
        let admin = settings.room.serviceAdmins.contains(creator)
        let allowed: Bool
        switch settings.creation {
        case .anyone: allowed = true
        case .local: allowed = host.isLocal(creator.domainpart)
        case .listed: allowed = settings.creators.contains(creator) || settings.creators.contains(creator.domain)
        case .admins: allowed = false
        }
        guard allowed && host.allows(settings.createAccess, user: creator, address: nil) || admin else { return refuse(input, .notAllowed, text: "you may not create rooms on this service") }
        guard roomCount.load(ordering: .relaxed) < settings.maxRooms else {
            return refuse(input, .resourceConstraint, text: "this service has as many rooms as it may", type: "wait")
        }
        guard let jid = try? JID(localpart: name, domainpart: settings.domain) else { return refuse(input, .jidMalformed) }
        let event = MUCRoomEvent(room: MUCRoomInfo(jid: jid, options: settings.defaults, occupants: 0, subject: ""), actor: input.from, nick: nick,
                                 ownedRooms: ownerCounts[creator] ?? 0)
        switch hooks.run(.mucRoomCreate, event) {
        case .pass, .modify: break
        case .handled: return refuse(input, .notAllowed, text: "refused by the service's policy")
        case .reject(let condition, let text): return refuse(input, condition, text: text)
        case .refuse(let error): return refuse(input, error)
        }
        let room = Room.created(jid: jid, creator: creator, options: settings.defaults, settings: settings.room, hooks: hooks,
                                locked: settings.lockNewRooms)
        let fresh = RoomHandle(room: room)
        // Two first joins at once: one creates, the other joins what it created.
        let handle: RoomHandle = rooms.withValue(for: name) { existing in
            if let existing { return existing }
            existing = fresh
            return fresh
        }
        if handle === fresh {
            roomCount.add(1, ordering: .relaxed)
            ownerCounts.withValue(for: creator) { $0 = ($0 ?? 0) + 1 }
            if settings.defaults.persistent && !settings.lockNewRooms { write(.all(room.stored), room: jid) }
        }
        submit(input, to: handle)
    }

    /// Stanzas for a room that does not exist (§7.2.11, §7.2.2).
    private func noSuchRoom(_ input: ComponentStanza) {
        let stanza = input.stanza
        switch (stanza.name, stanza[attribute: "type"]) {
        case ("presence", nil) where input.to.resourcepart != nil:
            // A client that thinks it is in a room that is gone (say, after a restart) learns it is not.
            var kick = XMLElement(name: "presence", namespace: Namespace.client, attributes: [
                "from": input.to.description, "to": input.from.description, "type": "unavailable",
            ])
            var x = XMLElement(name: "x", namespace: MUCNamespace.user)
            x.append(XMLElement(name: "item", namespace: MUCNamespace.user, attributes: ["affiliation": "none", "role": "none"]))
            for code in [110, 307, 333] { x.append(XMLElement(name: "status", namespace: MUCNamespace.user, attributes: ["code": String(code)])) }
            kick.append(x)
            host.route(kick)
        case ("presence", _):
            break
        case ("iq", "get"), ("iq", "set"), ("message", _):
            refuse(input, .itemNotFound, text: "no such room")
        default:
            break
        }
    }

    private func serviceStanza(_ input: ComponentStanza) {
        let stanza = input.stanza
        guard stanza.name == "iq", let type = stanza[attribute: "type"], type == "get" || type == "set", let payload = stanza.elements.first else {
            if stanza.name == "message" { refuse(input, .serviceUnavailable) }
            return
        }
        switch (payload.name, payload.namespace, type) {
        case ("query", MUCNamespace.discoInfo, "get") where payload[attribute: "node"] == nil:
            var query = XMLElement(name: "query", namespace: MUCNamespace.discoInfo)
            query.append(XMLElement(name: "identity", namespace: MUCNamespace.discoInfo, attributes: ["category": "conference", "type": "text", "name": settings.name]))
            for feature in [MUCNamespace.muc, MUCNamespace.discoInfo, MUCNamespace.discoItems, MUCNamespace.stableID, MUCNamespace.selfPing,
                            MUCNamespace.occupantID].sorted() {
                query.append(XMLElement(name: "feature", namespace: MUCNamespace.discoInfo, attributes: ["var": feature]))
            }
            answer(input, query)
        case ("query", MUCNamespace.discoItems, "get") where payload[attribute: "node"] == nil:
            var query = XMLElement(name: "query", namespace: MUCNamespace.discoItems)
            var listed: [(String, String)] = []
            for (name, handle) in rooms.snapshot() {
                let listing = handle.listing.withLock { $0 }
                guard listing.listed else { continue }
                listed.append((name, listing.title.isEmpty ? name : listing.title))
            }
            for (name, title) in listed.sorted(by: { $0.0 < $1.0 }) {
                query.append(XMLElement(name: "item", namespace: MUCNamespace.discoItems, attributes: ["jid": "\(name)@\(settings.domain)", "name": title]))
            }
            answer(input, query)
        case ("ping", Namespace.ping, "get"):
            answer(input, nil)
        default:
            refuse(input, .serviceUnavailable)
        }
    }

    // MARK: Carrying out

    private func carryOut(_ actions: [RoomAction], for handle: RoomHandle) {
        let name = handle.room.jid.localpart ?? ""
        for action in actions {
            switch action {
            case .send(let stanza):
                host.route(stanza)
            case .broadcast(let stanza, let sessions):
                host.deliver(stanza, to: sessions)
            case .store(let operation):
                write(operation, room: handle.room.jid)
            case .joined(let session):
                sessionRooms.withValue(for: session) { $0 = ($0 ?? []).union([name]) }
            case .left(let session):
                sessionRooms.withValue(for: session) { rooms in
                    rooms?.remove(name)
                    if rooms?.isEmpty == true { rooms = nil }
                }
            case .owners(let owners):
                adjustOwners(from: handle.owners, to: owners)
                handle.owners = owners
            case .closed:
                handle.closed = true
                adjustOwners(from: handle.owners, to: [])
                let removed: Bool = rooms.withValue(for: name) { current in
                    guard current === handle else { return false }
                    current = nil
                    return true
                }
                if removed { roomCount.subtract(1, ordering: .relaxed) }
            case .archive(let message, let sender):
                _ = archive?.writer.submit([ArchiveWriter.Entry(archive: handle.room.jid, message: message, origin: sender)])
            case .archiveRequest(let input, let realJIDs):
                answerArchiveRequest(input, realJIDs: realJIDs)
            }
        }
        let room = handle.room
        handle.listing.withLock { $0 = RoomListing(room) }
    }

    private func adjustOwners(from old: Set<JID>, to new: Set<JID>) {
        for owner in old.subtracting(new) {
            ownerCounts.withValue(for: owner) { count in
                count = (count ?? 1) - 1
                if count! <= 0 { count = nil }
            }
        }
        for owner in new.subtracting(old) { ownerCounts.withValue(for: owner) { $0 = ($0 ?? 0) + 1 } }
    }

    /// Stores a room's change, after that room's earlier changes.
    private func write(_ operation: RoomWrite, room: JID) {
        guard let store else { return }
        let (host, archive) = (self.host, self.archive)
        writes.enqueue(room) {
            do {
                switch operation {
                case .all(let stored): try await store.replaceMUCRoom(stored)
                case .options(let stored): try await store.saveMUCRoom(stored)
                case .affiliation(let user, let record): try await store.setMUCAffiliation(room: room, user: user, record)
                case .delete:
                    try await store.deleteMUCRoom(room)
                    // A room's archive lasts as long as its stored record; what is still queued for it lands first.
                    if let archive {
                        await archive.writer.caughtUp()
                        try await archive.store.deleteArchive(room)
                    }
                }
            } catch {
                host.log(.error, "muc: cannot store a change to \(room) (it stays in effect until a restart): \(error)")
            }
        }
    }

    // MARK: Archives

    /// Runs a MAM request the room allowed: results come from the room, each message as occupants saw
    /// it, with the sender's real JID only for those allowed to see it (XEP-0313 §7.1.2).
    private func answerArchiveRequest(_ input: ComponentStanza, realJIDs: Bool) {
        guard let archive, let payload = input.stanza.elements.first else { return }
        let room = input.to.bare
        Task {
            // After the room's stored changes that are still queued (a destroyed room's archive goes
            // with it before a room of the same name is asked for its history).
            await withCheckedContinuation { continuation in writes.enqueue(room) { continuation.resume() } }
            do {
                switch (payload.name, input.stanza[attribute: "type"]) {
                case ("query", "get"):
                    answer(input, archive.runner.form())
                case ("metadata", _):
                    await archive.writer.caughtUp()
                    answer(input, try await archive.runner.metadata(of: room))
                case ("query", "set"):
                    let query: ArchiveQuery
                    do throws(ArchiveQuery.Refusal) { query = try ArchiveQuery(payload, fullText: archive.store.supportsFullTextSearch) } catch {
                        return refuse(input, error.condition, text: error.text)
                    }
                    if query.filter.with != nil && !realJIDs {
                        return refuse(input, .forbidden, text: "only those who may see real JIDs may filter by sender")
                    }
                    await archive.writer.caughtUp()
                    let host = self.host
                    let response = try await archive.runner.run(query, on: room) { result in
                        var result = result
                        result[attribute: "from"] = room.description
                        result[attribute: "to"] = input.from.description
                        host.route(result)
                    } forwarded: { stored, message in
                        var message = message
                        message.removeChildren("x", namespace: MUCNamespace.user)
                        if realJIDs {
                            var x = XMLElement(name: "x", namespace: MUCNamespace.user)
                            x.append(XMLElement(name: "item", namespace: MUCNamespace.user, attributes: ["jid": stored.with.description]))
                            message.append(x)
                        }
                        return message
                    }
                    switch response {
                    case .result(let fin): answer(input, fin)
                    case .error(let condition, let text): refuse(input, condition, text: text)
                    case .failure(let error): refuse(input, error)
                    }
                default:
                    refuse(input, .badRequest)
                }
            } catch {
                host.log(.error, "muc \(domain): archive query on \(room) failed: \(error)")
                refuse(input, .internalServerError, text: "the archive cannot be read right now")
            }
        }
    }

    /// Waits for what rooms still have queued for their archives (shutdown).
    func drainArchives() async {
        await archive?.writer.drain()
    }

    var archiveCounters: [String: Int] { archive?.writer.statusCounters ?? [:] }
    /// Room changes waiting to be stored.
    var pendingWrites: Int { writes.pending }

    // MARK: Sessions and shutdown

    /// A session closed: it leaves every room it was in.
    func sessionClosed(_ session: JID) {
        guard let names = sessionRooms.removeValue(forKey: session) else { return }
        for name in names {
            guard let handle = rooms[name] else { continue }
            handle.mailbox.submit { [self] in
                guard !handle.closed else { return }
                carryOut(handle.room.sessionClosed(session), for: handle)
            }
        }
    }

    /// Another cluster node serves the domain from now on: occupants here hear the service stop (332).
    func released() {
        serving.store(false, ordering: .releasing)
        shutdown()
    }

    /// The server is stopping: every occupant hears so (332) while it can still be told.
    func shutdown() {
        for (_, handle) in rooms.snapshot() {
            handle.mailbox.submit { [self] in
                guard !handle.closed else { return }
                carryOut(handle.room.shutdown(), for: handle)
            }
        }
    }

    // MARK: Replies

    private func answer(_ input: ComponentStanza, _ payload: XMLElement?) {
        var reply = input.stanza.iqResult(payload: payload)
        reply[attribute: "from"] = input.to.description
        reply[attribute: "to"] = input.from.description
        host.route(reply)
    }

    private func refuse(_ input: ComponentStanza, _ condition: StanzaErrorCondition, text: String? = nil, type: String? = nil) {
        refuse(input, StanzaError(condition, text: text, type: type))
    }

    private func refuse(_ input: ComponentStanza, _ error: StanzaError) {
        guard input.stanza[attribute: "type"] != "error", input.stanza[attribute: "type"] != "result" else { return }
        var reply = input.stanza.errorReply(error)
        reply[attribute: "from"] = input.to.description
        reply[attribute: "to"] = input.from.description
        host.route(reply)
    }
}

// MARK: Administration (the admin API)

extension MUCService {
    /// Every room, hidden and locked ones too, by name.
    func adminRoomList() throws(AdminCommandError) -> AdminValue {
        try requireServing()
        let rooms = self.rooms.snapshot().map { name, handle -> (String, RoomListing) in (name, handle.listing.withLock { $0 }) }
        return .list(rooms.sorted { $0.0 < $1.0 }.map { name, listing in
            .object(["name": .string(name), "jid": .string("\(name)@\(settings.domain)"), "title": .string(listing.title),
                     "occupants": .int(listing.occupants), "public": .bool(listing.listed), "persistent": .bool(listing.persistent)])
        })
    }

    /// Creates a room owned by `owner`, open at once (not locked), persistent unless told otherwise. The
    /// operator is above the service's policy: `room_creators` and the creation hook do not apply.
    func adminCreateRoom(_ arguments: [String: AdminValue]) throws(AdminCommandError) -> AdminValue {
        try requireServing()
        let name = try ModuleRegistrar.required("name", in: arguments)
        guard let owner = JID(try ModuleRegistrar.required("owner", in: arguments))?.bare, owner.localpart != nil else {
            throw AdminCommandError(.invalid, "'owner' must be a user's JID")
        }
        guard let jid = try? JID(localpart: name, domainpart: settings.domain) else { throw AdminCommandError(.invalid, "'\(name)' is not a valid room name") }
        guard roomCount.load(ordering: .relaxed) < settings.maxRooms else { throw AdminCommandError(.conflict, "the service has max_rooms rooms already") }
        var options = settings.defaults
        options.persistent = arguments["persistent"]?.bool ?? true
        if let isPublic = arguments["public"]?.bool { options.isPublic = isPublic }
        if let title = arguments["title"]?.string { options.name = title }
        let room = Room.created(jid: jid, creator: owner, options: options, settings: settings.room, hooks: hooks, locked: false)
        room.justCreated = false
        let fresh = RoomHandle(room: room)
        let created: Bool = rooms.withValue(for: jid.localpart!) { existing in
            if existing != nil { return false }
            existing = fresh
            return true
        }
        guard created else { throw AdminCommandError(.conflict, "\(jid) exists already") }
        roomCount.add(1, ordering: .relaxed)
        ownerCounts.withValue(for: owner) { $0 = ($0 ?? 0) + 1 }
        if options.persistent { write(.all(room.stored), room: jid) }
        return .object(["jid": .string(jid.description), "owner": .string(owner.description), "persistent": .bool(options.persistent)])
    }

    /// Destroys a room: its occupants hear so (with the reason), and a persistent room's record and archive go.
    func adminDestroyRoom(_ arguments: [String: AdminValue]) async throws(AdminCommandError) -> AdminValue {
        try requireServing()
        let name = try ModuleRegistrar.required("name", in: arguments)
        let reason = arguments["reason"]?.string
        guard let handle = rooms[name] else { throw AdminCommandError(.notFound, "no room \(name)@\(settings.domain)") }
        let destroyed: Bool? = await withCheckedContinuation { continuation in
            let accepted = handle.mailbox.submit { [self] in
                guard !handle.closed else { return continuation.resume(returning: false) }
                carryOut(handle.room.destroyedByAdministrator(reason: reason), for: handle)
                continuation.resume(returning: true)
            }
            if !accepted { continuation.resume(returning: nil) }
        }
        switch destroyed {
        case true?: return .object(["jid": .string("\(name)@\(settings.domain)"), "destroyed": .bool(true)])
        case false?: throw AdminCommandError(.notFound, "no room \(name)@\(settings.domain)")
        case nil: throw AdminCommandError(.unavailable, "the room is too busy, try again")
        }
    }

    private func requireServing() throws(AdminCommandError) {
        guard serving.load(ordering: .acquiring) else {
            throw AdminCommandError(.unavailable, "another node of the cluster serves \(settings.domain): ask that one")
        }
        guard loaded.load(ordering: .acquiring) else { throw AdminCommandError(.unavailable, "\(settings.domain) is still loading its rooms") }
    }
}

/// Policy hooks run on the module's host.
struct HostHooks: HookRunner {
    let host: any ModuleHost
    func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult { host.run(point, event) }
}
