import StarlingAPI
import StarlingXML
import StarlingCluster

/// Connects this node's cluster membership to its session table and router: applies what peers announce,
/// delivers what they forward, and tells modules when a node's sessions are lost or come back.
final class ClusterBridge: ClusterDelegate {
    private let registry: SessionRegistry
    private let router: Router
    private let detached: DetachedSessions
    private let resumptions: RemoteResumptions

    init(registry: SessionRegistry, router: Router, detached: DetachedSessions, resumptions: RemoteResumptions) {
        self.registry = registry
        self.router = router
        self.detached = detached
        self.resumptions = resumptions
    }

    func localSessions() -> [ClusterSession] { registry.localEntries }

    func localClaims() -> [(domain: String, claimedAt: UInt64)] { router.localClaims }

    func received(_ frame: ClusterFrame, from node: String) {
        switch frame {
        case .session(let entry):
            registry.applyRemote(entry, from: node)?.close(.conflict)
        case .unbound(let jid, let boundAt):
            registry.removeRemote(jid, boundAt: boundAt, from: node)
        case .deliver(let stanza, let recipients, let addressed):
            router.deliverForwarded(stanza, to: recipients, addressed: addressed)
        case .claim(let domain, let claimedAt):
            router.applyClaim(domain, node: node, claimedAt: claimedAt)
        case .component(let stanza, let from, let to):
            router.deliverToComponent(stanza, from: from, to: to)
        case .closeSession(let jid, let condition):
            registry.localSession(jid)?.close(StreamErrorCondition(rawValue: condition) ?? .notAuthorized)
        case .module(let host, let message):
            _ = router.run(.clusterMessage, ClusterMessageEvent(node: node, message: message), on: host)
        case .resumeRequest(let id, let user, let request):
            // The session leaves this node only if it is still here, detached, and the account's.
            guard let entry = detached.take(id, user: user) else {
                _ = router.cluster?.send(.resumeState(request: request, nil), to: node)
                return
            }
            let router = self.router
            entry.moveAway { moved in _ = router.cluster?.send(.resumeState(request: request, moved), to: node) }
        case .resumeState(let request, let moved):
            resumptions.complete(request, moved)
        case .hello, .proof, .snapshotBegin, .sessions, .snapshotEnd, .ping, .pong, .goodbye:
            break
        }
    }

    func snapshot(_ sessions: [ClusterSession], claims: [(domain: String, claimedAt: UInt64)], from node: String) {
        router.dropClaims(of: node)
        for claim in claims { router.applyClaim(claim.domain, node: node, claimedAt: claim.claimedAt) }
        let (displaced, added, removed) = registry.replaceNode(node, with: sessions)
        for session in displaced { session.close(.conflict) }
        announce(node: node, lost: removed, restored: added)
    }

    func lost(_ node: String) {
        router.dropClaims(of: node)
        announce(node: node, lost: registry.removeNode(node), restored: [])
    }

    /// Each host's modules hear of their own accounts' sessions.
    private func announce(node: String, lost: [ResourceState], restored: [ResourceState]) {
        // Before this node has sessions of its own (linking at start) nobody here needs telling.
        let restored = registry.sessionCount > 0 ? restored : []
        guard !lost.isEmpty || !restored.isEmpty else { return }
        let info: (ResourceState) -> ResourceInfo = {
            ResourceInfo(jid: $0.jid, available: $0.available, priority: $0.priority, isLocal: false, presence: $0.presence, flags: $0.flags)
        }
        for host in router.hosts {
            let event = ClusterSessionsEvent(node: node, lost: lost.filter { $0.jid.domainpart == host }.map(info),
                                             restored: restored.filter { $0.jid.domainpart == host }.map(info))
            if !event.lost.isEmpty || !event.restored.isEmpty { _ = router.run(.clusterSessionsChanged, event, on: host) }
        }
    }
}
