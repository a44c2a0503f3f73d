import ArgumentParser
import Foundation
import StarlingAPI
import StarlingStorage
import StarlingTestClient

/// Query latency on a large archive: one account's archive is filled directly in storage (a million
/// messages with ten contacts, say), then the account pages through it the way clients do.
struct ArchiveQueries: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mam-query",
        abstract: "Latency of XEP-0313 queries (a page each) on one account's archive of N messages, filled directly in storage.")

    @OptionGroup var options: TargetOptions
    @Option(help: "Messages in the archive.") var messages = 1_000_000
    @Option(help: "Queries of each kind.") var queries = 200
    @Option(help: "Results per page.") var page = 50

    func validate() throws {
        guard messages > 0, queries > 0, page > 0 else { throw ValidationError("messages, queries and page must be positive") }
        guard options.target == nil else { throw ValidationError("mam-query fills the archive in storage: it runs on the starling it starts") }
    }

    func run() async throws {
        let owner = JID("\(options.accountPrefix)0@\(options.domain)")!
        let contacts = (1...10).map { JID("contact\($0)@elsewhere.example/r")! }
        let fillStart = Date()
        var ids: [String] = []
        ids.reserveCapacity(messages)
        let server = try await ServerUnderTest.prepare(options, accounts: 1, defaultConfig: Chat.modules(archiving: true)) { store in
            // A year of history, one message every ~30 s, oldest first.
            let first = Date().addingTimeInterval(-365 * 86_400)
            let step = 365 * 86_400 / Double(messages)
            var batch: [(archive: JID, message: ArchivedMessage)] = []
            for index in 0..<messages {
                let id = StanzaID.make(stamp: StanzaID.firstStamp(at: first.addingTimeInterval(Double(index) * step)), random: UInt32.random(in: 0...UInt32.max))
                ids.append(id)
                let with = contacts[index % contacts.count]
                let body = "message \(index) about \(["apples", "pears", "plums", "figs"][index % 4])"
                let (from, to) = index % 2 == 0 ? (with.description, owner.description) : ("\(owner)/r", with.bare.description)
                batch.append((owner, ArchivedMessage(id: id, with: with, stanza: "<message xmlns='jabber:client' from='\(from)' to='\(to)' type='chat'><body>\(body)</body></message>", body: body)))
                if batch.count == 5000 {
                    try await store.archive(batch)
                    batch = []
                }
            }
            try await store.archive(batch)
        }
        defer { server.stop() }
        let fillSeconds = Date().timeIntervalSince(fillStart)
        let client = try await TestClient.login(port: server.port, domain: options.domain, tls: .none, username: "\(options.accountPrefix)0",
                                                password: options.password, mechanism: "PLAIN")
        let form = "<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>"
        let kinds: [(name: String, query: () -> String)] = [
            ("last_page", { "<set xmlns='http://jabber.org/protocol/rsm'><max>\(page)</max><before/></set>" }),
            ("page_after_random_id", { "<set xmlns='http://jabber.org/protocol/rsm'><max>\(page)</max><after>\(ids.randomElement()!)</after></set>" }),
            ("page_before_random_id", { "<set xmlns='http://jabber.org/protocol/rsm'><max>\(page)</max><before>\(ids.randomElement()!)</before></set>" }),
            ("with_contact_last_page", {
                "<x xmlns='jabber:x:data' type='submit'>\(form)<field var='with'><value>\(contacts.randomElement()!.bare)</value></field></x>"
                    + "<set xmlns='http://jabber.org/protocol/rsm'><max>\(page)</max><before/></set>"
            }),
            ("since_random_day", {
                let day = Date().addingTimeInterval(-Double(Int.random(in: 1...364)) * 86_400)
                return "<x xmlns='jabber:x:data' type='submit'>\(form)<field var='start'><value>\(XMPPDateTime.string(day))</value></field></x>"
                    + "<set xmlns='http://jabber.org/protocol/rsm'><max>\(page)</max></set>"
            }),
        ]
        var result: [String: Any] = ["scenario": "mam-query", "backend": options.backend, "messages": messages, "page": page,
                                     "queries_per_kind": queries, "fill_seconds": fillSeconds]
        for kind in kinds {
            var latencies: [Double] = []
            // The first queries after the fill meet cold caches and a table without statistics: untimed.
            for index in -20..<queries {
                let id = "q\(index)"
                let started = DispatchTime.now().uptimeNanoseconds
                client.send("<iq type='set' id='\(id)'><query xmlns='urn:xmpp:mam:2' queryid='\(id)'>\(kind.query())</query></iq>")
                var results = 0
                while true {
                    let stanza = try await client.expect("results of \(id)") {
                        ($0.name == "iq" && $0[attribute: "id"] == id) || $0.child("result", namespace: "urn:xmpp:mam:2")?[attribute: "queryid"] == id
                    }
                    if stanza.name == "iq" {
                        guard stanza[attribute: "type"] == "result" else { throw LoadError(reason: "\(kind.name) failed: \(stanza.serialized())") }
                        break
                    }
                    results += 1
                }
                if index >= 0 { latencies.append(Double(DispatchTime.now().uptimeNanoseconds - started) / 1e6) }
                if results == 0 && kind.name == "last_page" { throw LoadError(reason: "the archive answered no results") }
            }
            latencies.sort()
            result["\(kind.name)_ms_p50"] = latencies[latencies.count / 2]
            result["\(kind.name)_ms_p99"] = latencies[min(latencies.count - 1, latencies.count * 99 / 100)]
        }
        try printResult(result)
        await client.close()
    }
}
