import StarlingAPI
import StarlingStorage
import Synchronization

/// Which messages go into whose archive (XEP-0441 preferences over the server's default), decided
/// from memory: the stanza path never waits on storage. Accounts that set preferences are few, so all
/// their preferences live in memory, with the rosters of those whose default is "roster".
final class ArchivePolicy: Sendable {
    let serverDefault: Bool
    private let preferences = ShardedDictionary<JID, ArchivePreferences>()
    private let rosters = ShardedDictionary<JID, Set<JID>>()
    /// How many accounts have preferences: while none has, every decision is the server's default.
    private let custom = Atomic<Int>(0)

    init(serverDefault: Bool) {
        self.serverDefault = serverDefault
    }

    /// Whether a message between `owner` and `peer` goes into `owner`'s archive.
    func archives(owner: JID, peer: JID) -> Bool {
        guard custom.load(ordering: .relaxed) > 0, let preferences = preferences[owner] else { return serverDefault }
        if preferences.never.contains(where: { Self.matches($0, peer) }) { return false }
        if preferences.always.contains(where: { Self.matches($0, peer) }) { return true }
        switch preferences.defaultBehaviour {
        case .always: return true
        case .never: return false
        case .roster: return rosters[owner]?.contains(peer.bare) ?? false
        }
    }

    /// XEP-0441 §3: a listed bare JID matches every resource; a full JID only itself.
    private static func matches(_ listed: JID, _ target: JID) -> Bool {
        listed.resourcepart == nil ? listed == target.bare : listed == target
    }

    /// The preferences `owner` sees: its own, or the server's default.
    func preferences(of owner: JID) -> ArchivePreferences {
        preferences[owner] ?? ArchivePreferences(defaultBehaviour: serverDefault ? .always : .never)
    }

    /// Takes `owner`'s preferences (nil: back to the server's default), loading its roster if it needs it.
    func set(_ new: ArchivePreferences?, of owner: JID, rosterStore: (any RosterStore)?) async throws {
        if new?.defaultBehaviour == .roster, let rosterStore {
            let items = try await rosterStore.roster(of: owner).items
            rosters[owner] = Set(items.map(\.jid.bare))
        } else {
            rosters[owner] = nil
        }
        preferences.withValue(for: owner) { current in
            if current == nil && new != nil { custom.add(1, ordering: .relaxed) }
            if current != nil && new == nil { custom.subtract(1, ordering: .relaxed) }
            current = new
        }
    }

    /// A roster change of an account whose default is "roster".
    func rosterChanged(_ event: RosterChangeEvent) {
        guard custom.load(ordering: .relaxed) > 0, preferences[event.user]?.defaultBehaviour == .roster else { return }
        rosters.withValue(for: event.user) { roster in
            if event.subscription == "remove" { roster?.remove(event.contact.bare) } else { roster = (roster ?? []).union([event.contact.bare]) }
        }
    }
}
