import StarlingAPI

/// Spam filter: messages from blocked senders (JIDs or whole domains) are dropped silently before
/// they reach a local session, and messages whose body contains a listed keyword (case-insensitive,
/// plain text) are refused with `<policy-violation/>`, so the sender learns why.
public final class SpamFilterModule: ServerModule {
    public static let descriptor = ModuleDescriptor(
        name: "spam_filter", summary: "Keyword rules and JID/domain blocklists for messages.",
        options: [
            ModuleOptionSpec("keywords", .stringList, default: .stringList([]), doc: "Words or phrases that get a message refused (case-insensitive)."),
            ModuleOptionSpec("blocked_jids", .stringList, default: .stringList([]), doc: "Senders (bare JIDs) whose messages are dropped."),
            ModuleOptionSpec("blocked_domains", .stringList, default: .stringList([]), doc: "Domains whose users' messages are dropped."),
        ]
    )

    private let keywords: [String]
    private let blockedJIDs: Set<JID>
    private let blockedDomains: Set<String>

    public init(host: any ModuleHost) throws {
        keywords = host.options.stringList("keywords").map { $0.lowercased() }.filter { !$0.isEmpty }
        var jids = Set<JID>()
        for text in host.options.stringList("blocked_jids") {
            guard let jid = JID(text) else { throw SpamFilterError(description: "spam_filter: '\(text)' in blocked_jids is not a JID") }
            jids.insert(jid.bare)
        }
        blockedJIDs = jids
        blockedDomains = Set(try host.options.stringList("blocked_domains").map { text in
            guard let jid = JID(text), jid.localpart == nil, jid.resourcepart == nil else {
                throw SpamFilterError(description: "spam_filter: '\(text)' in blocked_domains is not a domain")
            }
            return jid.domainpart
        })
    }

    public func register(_ registrar: ModuleRegistrar) {
        // Messages to users are judged as they are delivered (whoever sent them); groupchat messages as a
        // local occupant sends them, before the room passes them on to everyone.
        registrar.hook(.stanzaToUser, priority: 900) { [self] event in
            guard event.stanza.name == "message", event.stanza[attribute: "type"] != "error", event.stanza[attribute: "type"] != "groupchat",
                  let from = event.stanza[attribute: "from"].flatMap({ JID($0) }) else { return .pass }
            return judge(event.stanza, sender: from)
        }
        registrar.hook(.stanzaFromClient, priority: 900) { [self] event in
            guard event.stanza.name == "message", event.stanza[attribute: "type"] == "groupchat", let origin = event.origin else { return .pass }
            return judge(event.stanza, sender: origin)
        }
    }

    private func judge(_ message: XMLElement, sender: JID) -> HookResult {
        if blockedJIDs.contains(sender.bare) || blockedDomains.contains(sender.domainpart) { return .handled }
        guard !keywords.isEmpty, let body = message.child("body")?.text.lowercased() else { return .pass }
        for keyword in keywords where body.contains(keyword) {
            return .reject(.policyViolation, text: "message refused by the spam filter")
        }
        return .pass
    }
}

struct SpamFilterError: Error, CustomStringConvertible {
    let description: String
}

@_cdecl("starling_plugin_api_version")
public func starlingPluginAPIVersion() -> Int { StarlingAPIVersion.compiledAPI }

@_cdecl("starling_plugin_module")
public func starlingPluginModule() -> UnsafeMutableRawPointer { StarlingPlugin.export(SpamFilterModule.self) }
