import NIOConcurrencyHelpers
import NIOEmbedded
import StarlingAPI
import StarlingCluster
@testable import StarlingServer
import XCTest

/// The session table with other nodes' sessions in it: who wins a resource, what goes when a node goes.
final class ClusterSessionTableTests: XCTestCase {
    private let loop = EmbeddedEventLoop()
    private let changes = NIOLockedValueBox<[LocalSessionChange]>([])

    private func makeRegistry() -> SessionRegistry {
        SessionRegistry { [changes] change in changes.withLockedValue { $0.append(change) } }
    }

    private func bind(_ registry: SessionRegistry, _ user: String, _ resource: String, max: Int = 10) -> (SessionRegistry.BindOutcome, ClientSession?) {
        var made: ClientSession?
        let outcome = registry.bind(user: JID(user)!, resource: resource, maxSessions: max) { jid in
            let session = ClientSession(jid: jid, eventLoop: loop, deliver: { _ in }, close: { _ in }, hold: { _ in })
            made = session
            return session
        }
        return (outcome, made)
    }

    private func remote(_ jid: String, at boundAt: UInt64, available: Bool = true) -> ClusterSession {
        ClusterSession(jid: JID(jid)!, boundAt: boundAt, priority: 1,
                       presence: available ? XMLElement(name: "presence", namespace: Namespace.client) : nil, flags: ["carbons"])
    }

    func testLocalChangesAreAnnouncedOnceEach() throws {
        let registry = makeRegistry()
        let (_, session) = bind(registry, "a@localhost", "r")
        let presence = XMLElement(name: "presence", namespace: Namespace.client)
        registry.setPresence(of: session!.jid, presence, priority: 3)
        registry.setAvailability(of: session!.jid, available: true, priority: 3)
        registry.setFlag("roster", true, for: session!.jid)
        registry.unbind(session!)
        let seen = changes.withLockedValue { $0 }
        XCTAssertEqual(seen.count, 4, "bind, presence, flag, unbind; the repeated availability is not news: \(seen)")
        guard case .updated(let bound) = seen[0], case .updated(let available) = seen[1], case .updated(let flagged) = seen[2],
              case .unbound(let jid, let boundAt) = seen[3] else { return XCTFail("\(seen)") }
        XCTAssertNil(bound.presence)
        XCTAssertEqual(available.priority, 3)
        XCTAssertEqual(flagged.flags, ["roster"])
        XCTAssertEqual(jid, session!.jid)
        XCTAssertEqual(boundAt, bound.boundAt)
    }

    func testRemoteSessionsRouteAndCountTowardsTheAccountsLimit() {
        let registry = makeRegistry()
        XCTAssertNil(registry.applyRemote(remote("a@localhost/one", at: 1), from: "b"))
        XCTAssertNil(registry.applyRemote(remote("a@localhost/two", at: 2, available: false), from: "c"))
        guard case .remote("b")? = registry.location(of: JID("a@localhost/one")!) else { return XCTFail("not routed to b") }
        let resources = registry.resources(of: JID("a@localhost")!)
        XCTAssertEqual(resources.count, 2)
        XCTAssertEqual(resources.first { $0.jid.resourcepart == "one" }?.flags, ["carbons"])
        XCTAssertEqual(registry.sessionCount, 0, "only local sessions count as this node's")
        XCTAssertEqual(registry.allResources.count, 2)
        guard case .failed(.resourceConstraint) = bind(registry, "a@localhost", "three", max: 2).0 else { return XCTFail("limit not cluster-wide") }
    }

    func testTheLaterBindingOfAFullJIDWinsOnEveryNode() {
        let registry = makeRegistry()
        let (_, local) = bind(registry, "a@localhost", "r")
        let localBoundAt = registry.resources(of: JID("a@localhost")!)[0].boundAt
        // An older binding elsewhere (announced late) loses: nothing changes here.
        XCTAssertNil(registry.applyRemote(remote("a@localhost/r", at: localBoundAt - 1), from: "b"))
        XCTAssertTrue(registry.localSession(JID("a@localhost/r")!) === local)
        // A newer one wins: the local session is handed back for closing with <conflict/>.
        XCTAssertTrue(registry.applyRemote(remote("a@localhost/r", at: localBoundAt + 1), from: "b") === local)
        guard case .remote("b")? = registry.location(of: JID("a@localhost/r")!) else { return XCTFail("not taken over") }
        // The displaced session's own unbind does not remove its successor.
        registry.unbind(local!)
        XCTAssertNotNil(registry.location(of: JID("a@localhost/r")!))
        // Nor does a late unbind from another node that no longer holds it.
        registry.removeRemote(JID("a@localhost/r")!, boundAt: localBoundAt + 1, from: "c")
        XCTAssertNotNil(registry.location(of: JID("a@localhost/r")!))
        registry.removeRemote(JID("a@localhost/r")!, boundAt: localBoundAt + 1, from: "b")
        XCTAssertNil(registry.location(of: JID("a@localhost/r")!))
    }

    func testANodesSessionsGoWithItAndASnapshotSaysWhatChanged() {
        let registry = makeRegistry()
        _ = bind(registry, "a@localhost", "here")
        _ = registry.applyRemote(remote("a@localhost/there", at: 1), from: "b")
        _ = registry.applyRemote(remote("b@localhost/gone", at: 1), from: "b")
        _ = registry.applyRemote(remote("c@localhost/other", at: 1), from: "c")
        let (_, added, removed) = registry.replaceNode("b", with: [remote("a@localhost/there", at: 1), remote("d@localhost/new", at: 5)])
        XCTAssertEqual(added.map(\.jid.description), ["d@localhost/new"])
        XCTAssertEqual(removed.map(\.jid.description), ["b@localhost/gone"])
        let lost = registry.removeNode("b").map(\.jid.description).sorted()
        XCTAssertEqual(lost, ["a@localhost/there", "d@localhost/new"])
        XCTAssertEqual(registry.allResources.map(\.jid.description).sorted(), ["a@localhost/here", "c@localhost/other"])
        XCTAssertEqual(registry.localEntries.map(\.jid.description), ["a@localhost/here"])
    }
}
