import Foundation
import Logging
import StarlingAPI
import StarlingMAM
import StarlingSQLite
import StarlingStorage
import StarlingXML
import Synchronization
import XCTest

/// The archive writer's promises: one flooding session is held back alone, the queue never grows past
/// its bound, a failing store releases everyone and is retried, and nothing accepted is lost.
final class ArchiveWriterTests: XCTestCase {
    /// A real SQLite store behind a gate the test opens, and that can be made to fail: storage that
    /// is slow or down on demand.
    final class GatedStore: ArchiveStore, Sendable {
        let inner: SQLiteStore
        private let state = Mutex<(open: Bool, failures: Int, waiting: [CheckedContinuation<Void, Never>])>((false, 0, []))

        init(_ inner: SQLiteStore) { self.inner = inner }

        func open() {
            let waiting = state.withLock { state -> [CheckedContinuation<Void, Never>] in
                state.open = true
                defer { state.waiting = [] }
                return state.waiting
            }
            for continuation in waiting { continuation.resume() }
        }

        func fail(times: Int) { state.withLock { $0.failures = times } }

        func archive(_ entries: [(archive: JID, message: ArchivedMessage)]) async throws(StorageError) {
            await withCheckedContinuation { continuation in
                let go = state.withLock { state -> Bool in
                    if state.open { return true }
                    state.waiting.append(continuation)
                    return false
                }
                if go { continuation.resume() }
            }
            let fails = state.withLock { state -> Bool in
                guard state.failures > 0 else { return false }
                state.failures -= 1
                return true
            }
            if fails { throw .backend("the database is down") }
            try await inner.archive(entries)
        }

        var supportsFullTextSearch: Bool { inner.supportsFullTextSearch }
        var concurrentArchiveWrites: Int { inner.concurrentArchiveWrites }
        func archivedMessages(in archive: JID, matching filter: ArchiveFilter, limit: Int, fromEnd: Bool) async throws(StorageError) -> ArchivePage {
            try await inner.archivedMessages(in: archive, matching: filter, limit: limit, fromEnd: fromEnd)
        }
        func archivedCount(in archive: JID, matching filter: ArchiveFilter) async throws(StorageError) -> Int {
            try await inner.archivedCount(in: archive, matching: filter)
        }
        func archivedIDs(in archive: JID, among ids: [String]) async throws(StorageError) -> Set<String> { try await inner.archivedIDs(in: archive, among: ids) }
        func trimArchive(_ archive: JID, keep: Int) async throws(StorageError) -> Int { try await inner.trimArchive(archive, keep: keep) }
        func purgeArchives(host: String, user: String?, before date: Date) async throws(StorageError) -> Int {
            try await inner.purgeArchives(host: host, user: user, before: date)
        }
        func deleteArchive(_ archive: JID) async throws(StorageError) { try await inner.deleteArchive(archive) }
        func archivePreferences(host: String) async throws(StorageError) -> [JID: ArchivePreferences] { try await inner.archivePreferences(host: host) }
        func setArchivePreferences(_ preferences: ArchivePreferences?, of user: JID) async throws(StorageError) {
            try await inner.setArchivePreferences(preferences, of: user)
        }
    }

    /// Records the holds the writer takes and releases.
    final class HoldingHost: QuietModuleHost, Sendable {
        final class Hold: ReadHold {
            let session: JID
            let released = Atomic<Bool>(false)
            init(session: JID) { self.session = session }
            func release() { released.store(true, ordering: .relaxed) }
        }

        let domain = "example.org"
        let options = ModuleOptions([:])
        let holds = Mutex<[Hold]>([])
        let logged = Mutex<[String]>([])
        func log(_ level: ModuleLogLevel, _ message: String) { logged.withLock { $0.append(message) } }
        func holdReads(of session: JID) -> (any ReadHold)? {
            let hold = Hold(session: session)
            holds.withLock { $0.append(hold) }
            return hold
        }
        func heldNow() -> [JID] { holds.withLock { $0.filter { !$0.released.load(ordering: .relaxed) }.map(\.session) } }
    }

    private func entry(_ index: Int, from origin: JID) -> ArchiveWriter.Entry {
        ArchiveWriter.Entry(archive: JID("owner@example.org")!, message: ArchivedMessage(
            id: StanzaID.next(), with: origin, stanza: "<message xmlns='jabber:client'><body>\(index)</body></message>"), origin: origin)
    }

    func testBackpressureBoundAndRetry() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("writer-\(UUID().uuidString).sqlite").path
        let sqlite = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = GatedStore(sqlite)
        let host = HoldingHost()
        let writer = ArchiveWriter(store: store, accounts: nil, host: host, name: "test",
                                   limits: ArchiveWriter.Limits(queued: 400, perSessionHigh: 100, perSessionLow: 10, batch: 50))
        let flooder = JID("flood@example.org/r")!
        let quiet = JID("quiet@example.org/r")!

        // The store is stalled: the flooder reaches its threshold and is held; a quiet session is not.
        for index in 0..<150 { XCTAssertTrue(writer.submit([entry(index, from: flooder)])) }
        for index in 0..<5 { XCTAssertTrue(writer.submit([entry(index, from: quiet)])) }
        XCTAssertEqual(host.heldNow(), [flooder])
        XCTAssertEqual(host.holds.withLock { $0.count }, 1, "one hold, however far past the threshold")

        // The queue is bounded: what does not fit is refused (delivered unarchived by the caller) and counted.
        var accepted = 155
        for index in 0..<300 where writer.submit([entry(index, from: quiet)]) { accepted += 1 }
        XCTAssertEqual(accepted, 400)
        XCTAssertEqual(writer.statusCounters["archive_dropped"], 55)
        XCTAssertEqual(Set(host.heldNow()), [flooder, quiet], "once the queue is half full, a lower backlog is enough to be held")

        // Storage down: holds go (nobody waits on an outage), the batch is retried, nothing is lost.
        store.fail(times: 1)
        store.open()
        await writer.caughtUp(timeout: 30)
        XCTAssertEqual(host.heldNow(), [])
        XCTAssertEqual(writer.statusCounters["archive_write_failures"], 1)
        XCTAssertTrue(host.logged.withLock { $0.contains { $0.contains("retrying") } })
        let stored = try await sqlite.archivedCount(in: JID("owner@example.org")!, matching: ArchiveFilter())
        XCTAssertEqual(stored, 400)
        XCTAssertEqual(writer.statusCounters["archive_written"], 400)
        XCTAssertEqual(writer.statusCounters["archive_queued"], 0)
        await writer.drain()
        await sqlite.close()
    }
}

/// XEP-0313 queries as parsed from the wire, and what is refused.
final class ArchiveQueryTests: XCTestCase {
    private func parse(_ xml: String, fullText: Bool = false) throws -> ArchiveQuery {
        let element = try XCTUnwrap(XMLFragmentParser.parse(xml))
        return try ArchiveQuery(element, fullText: fullText)
    }

    private func refusal(_ xml: String, fullText: Bool = false) throws -> StanzaErrorCondition? {
        do { _ = try parse(xml, fullText: fullText); return nil } catch let refusal as ArchiveQuery.Refusal { return refusal.condition }
    }

    private let form = "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>"

    func testFieldsAndPaging() throws {
        let query = try parse("""
            <query xmlns='urn:xmpp:mam:2' queryid='q1'>\(form)<field var='with'><value>bob@example.org/desk</value></field>
            <field var='start'><value>2026-01-02T03:04:05Z</value></field><field var='end'><value>2026-01-02T04:04:05.5+01:00</value></field>
            <field var='ids'><value>a</value><value>b</value></field><field var='include-groupchat'><value>false</value></field></x>
            <set xmlns='http://jabber.org/protocol/rsm'><max>5</max><before/></set><flip-page/></query>
            """)
        XCTAssertEqual(query.queryID, "q1")
        XCTAssertEqual(query.filter.with, JID("bob@example.org/desk"))
        XCTAssertEqual(query.filter.start, Date(timeIntervalSince1970: 1_767_323_045))
        XCTAssertEqual(query.filter.end, Date(timeIntervalSince1970: 1_767_323_045.5))
        XCTAssertEqual(query.filter.ids, ["a", "b"])
        XCTAssertEqual(query.max, 5)
        XCTAssertEqual(query.before, "", "an empty <before/> asks for the last page")
        XCTAssertNil(query.after)
        XCTAssertTrue(query.flip)
        let bare = try parse("<query xmlns='urn:xmpp:mam:2'/>")
        XCTAssertEqual(bare, try parse("<query xmlns='urn:xmpp:mam:2'>\(form)</x></query>"))
        let text = try parse("<query xmlns='urn:xmpp:mam:2'>\(form)<field var='{urn:xmpp:fulltext:0}fulltext'><value> apple pie </value></field></x></query>", fullText: true)
        XCTAssertEqual(text.filter.text, "apple pie")
    }

    func testRefusals() throws {
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'>\(form)<field var='colour'><value>red</value></field></x></query>"), .featureNotImplemented)
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'>\(form)<field var='{urn:xmpp:fulltext:0}fulltext'><value>x</value></field></x></query>"),
                       .featureNotImplemented, "full-text search only where the store offers it")
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'>\(form)<field var='start'><value>2026-13-01T00:00:00Z</value></field></x></query>"), .badRequest)
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'>\(form)<field var='with'><value>a@b@c</value></field></x></query>"), .badRequest)
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='form'/></query>"), .badRequest)
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>urn:xmpp:mam:1</value></field></x></query>"), .badRequest)
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><max>-1</max></set></query>"), .badRequest)
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><after>a</after><before>b</before></set></query>"), .badRequest)
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><index>3</index></set></query>"), .featureNotImplemented)
        let ids = (0...100).map { "<value>\($0)</value>" }.joined()
        XCTAssertEqual(try refusal("<query xmlns='urn:xmpp:mam:2'>\(form)<field var='ids'>\(ids)</field></x></query>"), .policyViolation)
    }
}
