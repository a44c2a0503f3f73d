import Crypto
import Foundation
import StarlingAPI
import Synchronization

/// What a client supports, learnt from XEP-0115 entity capabilities: the `ver` in its presence, checked
/// against its disco#info answer, names a feature set every client of that version shares.
final class EntityCaps: Sendable {
    /// A presence's `<c/>`.
    struct Advertised: Sendable, Hashable {
        let node: String
        let ver: String
        /// The hash function (`sha-1`, ...); nil for pre-1.4 caps, whose `ver` cannot be verified.
        let hash: String?

        init?(_ presence: XMLElement) {
            guard let c = presence.child("c", namespace: PubSubNamespace.caps), let node = c[attribute: "node"], let ver = c[attribute: "ver"],
                  !ver.isEmpty else { return nil }
            self.node = node
            self.ver = ver
            hash = c[attribute: "hash"]
        }
    }

    private struct State {
        /// Verified feature sets by hash and `ver`.
        var verified: [String: Set<String>] = [:]
        /// Unverifiable answers, per full JID (only that resource is known to have them).
        var perResource: [JID: (ver: String, features: Set<String>)] = [:]
        /// disco#info queries in flight, by IQ id.
        var pending: [String: (jid: JID, continuation: CheckedContinuation<XMLElement?, Never>)] = [:]
    }

    /// Bounded: a flood of invented `ver`s cannot grow memory past it.
    private let limit: Int
    private let state = Mutex(State())
    private let counter = Atomic<Int>(0)

    init(limit: Int = 4096) { self.limit = limit }

    /// The features a resource with this presence has, if already known.
    func features(of jid: JID, presence: XMLElement?) -> Set<String>? {
        guard let presence, let caps = Advertised(presence) else { return nil }
        return known(jid, caps)
    }

    private func known(_ jid: JID, _ caps: Advertised) -> Set<String>? {
        state.withLock { state in
            if let features = state.verified[Self.key(caps)] { return features }
            if let known = state.perResource[jid], known.ver == caps.ver { return known.features }
            return nil
        }
    }

    /// Learns a feature set another node verified.
    func learn(key: String, features: Set<String>) {
        state.withLock { state in
            if state.verified.count >= limit { state.verified.removeAll(keepingCapacity: true) }
            state.verified[key] = features
        }
    }

    /// Resolves what `jid` supports, asking it with disco#info (through `send`) when its `ver` is new.
    /// Returns the features, and the verified key when the answer matched its hash (to share it).
    func resolve(_ jid: JID, caps: Advertised, from domain: String, send: (XMLElement) -> Void,
                 timeout: Duration = .seconds(10)) async -> (features: Set<String>, verifiedKey: String?)? {
        if let known = known(jid, caps) { return (known, nil) }
        let id = "caps-\(counter.add(1, ordering: .relaxed).newValue)"
        var query = XMLElement(name: "iq", namespace: Namespace.client, attributes: ["type": "get", "id": id, "from": domain, "to": jid.description])
        query.append(XMLElement(name: "query", namespace: PubSubNamespace.discoInfo, attributes: ["node": "\(caps.node)#\(caps.ver)"]))
        let answer: XMLElement? = await withCheckedContinuation { continuation in
            state.withLock { $0.pending[id] = (jid, continuation) }
            send(query)
            Task {
                try? await Task.sleep(for: timeout)
                self.finish(id, with: nil)
            }
        }
        guard let answer, answer[attribute: "type"] == "result", let info = answer.child("query", namespace: PubSubNamespace.discoInfo) else { return nil }
        let features = Set(info.elements.filter { $0.name == "feature" }.compactMap { $0[attribute: "var"] })
        if let hash = caps.hash, let computed = Self.verificationHash(info, hash: hash), computed == caps.ver {
            let key = Self.key(caps)
            learn(key: key, features: features)
            return (features, key)
        }
        state.withLock { state in
            if state.perResource.count >= limit { state.perResource.removeAll(keepingCapacity: true) }
            state.perResource[jid] = (caps.ver, features)
        }
        return (features, nil)
    }

    /// Takes a client's answer to one of our queries; false when it is not one (the stanza goes on).
    func answer(_ iq: XMLElement, from jid: JID) -> Bool {
        guard let id = iq[attribute: "id"], id.hasPrefix("caps-"),
              state.withLock({ $0.pending[id]?.jid == jid }) else { return false }
        finish(id, with: iq)
        return true
    }

    func forget(_ jid: JID) {
        state.withLock { _ = $0.perResource.removeValue(forKey: jid) }
    }

    private func finish(_ id: String, with answer: XMLElement?) {
        state.withLock { $0.pending.removeValue(forKey: id) }?.continuation.resume(returning: answer)
    }

    static func key(_ caps: Advertised) -> String { "\(caps.hash ?? "legacy") \(caps.ver)" }

    /// XEP-0115 §5.1's verification string of a disco#info answer, hashed and base64-encoded; nil for an
    /// unknown hash function.
    static func verificationHash(_ info: XMLElement, hash: String) -> String? {
        let string = verificationString(info)
        let data = Data(string.utf8)
        switch hash.lowercased() {
        case "sha-1": return Data(Insecure.SHA1.hash(data: data)).base64EncodedString()
        case "sha-256": return Data(SHA256.hash(data: data)).base64EncodedString()
        case "sha-512": return Data(SHA512.hash(data: data)).base64EncodedString()
        default: return nil
        }
    }

    static func verificationString(_ info: XMLElement) -> String {
        var string = ""
        let identities = info.elements.filter { $0.name == "identity" }.map { identity in
            [identity[attribute: "category"] ?? "", identity[attribute: "type"] ?? "", identity[attribute: "xml:lang"] ?? identity[attribute: "lang"] ?? "",
             identity[attribute: "name"] ?? ""]
        }
        for identity in identities.sorted(by: { $0.lexicographicallyPrecedes($1) }) { string += identity.joined(separator: "/") + "<" }
        for feature in info.elements.filter({ $0.name == "feature" }).compactMap({ $0[attribute: "var"] }).sorted() { string += feature + "<" }
        let forms = info.elements.compactMap(DataForm.init).filter { $0.formType != nil }.sorted { $0.formType! < $1.formType! }
        for form in forms {
            string += form.formType! + "<"
            for field in form.fields.filter({ $0.variable != "FORM_TYPE" }).sorted(by: { ($0.variable ?? "") < ($1.variable ?? "") }) {
                string += (field.variable ?? "") + "<"
                for value in field.values.sorted() { string += value + "<" }
            }
        }
        return string
    }
}
