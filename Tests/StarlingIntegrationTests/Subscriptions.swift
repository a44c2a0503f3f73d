import StarlingAPI
import StarlingTestClient

/// Subscribes the accounts of `a` and `b` to each other's presence as clients do (a request, its approval,
/// the request back, its approval), and waits until each sees the other online (they may be on
/// different nodes of a cluster).
func befriend(_ a: TestClient, _ aJID: String, _ b: TestClient, _ bJID: String) async throws {
    a.send("<presence to='\(bJID)' type='subscribe'/>")
    _ = try await b.expect("subscribe") { $0.name == "presence" && $0[attribute: "type"] == "subscribe" }
    b.send("<presence to='\(aJID)' type='subscribed'/><presence to='\(aJID)' type='subscribe'/>")
    _ = try await a.expect("subscribe back") { $0.name == "presence" && $0[attribute: "type"] == "subscribe" }
    a.send("<presence to='\(bJID)' type='subscribed'/>")
    _ = try await b.expect("\(aJID) online") { $0.name == "presence" && $0[attribute: "type"] == nil && ($0[attribute: "from"] ?? "").hasPrefix(aJID) }
    _ = try await a.expect("\(bJID) online") { $0.name == "presence" && $0[attribute: "type"] == nil && ($0[attribute: "from"] ?? "").hasPrefix(bJID) }
}
