import Foundation
import StarlingAPI
import StarlingStorage
import XCTest

/// The archive part of the storage contract (XEP-0313): both backends answer every query the same way.
extension StoreContract {
    /// `count` messages between alice and two peers, one second apart from `start`.
    private func fill(_ archive: JID, count: Int, start: Date) async throws -> [ArchivedMessage] {
        var messages: [ArchivedMessage] = []
        for index in 0..<count {
            let peer = index % 3 == 0 ? JID("bob@\(host)/phone")! : JID("carol@\(host)/desk")!
            let stamp = StanzaID.firstStamp(at: start.addingTimeInterval(Double(index)))
            let id = StanzaID.make(stamp: stamp, random: UInt32(index * 7919 % 65_521))
            messages.append(ArchivedMessage(id: id, with: peer, stanza: "<message xmlns='jabber:client'><body>m\(index) apple</body></message>",
                                            body: index % 2 == 0 ? "m\(index) apple" : "m\(index) pear"))
        }
        // Two batches, the second repeating part of the first: repeats are skipped.
        try await store.archive(messages.prefix(count / 2).map { (archive, $0) })
        try await store.archive(messages.map { (archive, $0) })
        return messages
    }

    func archives() async throws {
        let alice = jid("alice")
        let start = Date(timeIntervalSince1970: 1_800_000_000)
        let all = try await fill(alice, count: 30, start: start)
        try await store.archive([(jid("other"), all[0])])
        func ids(_ page: ArchivePage) -> [String] { page.messages.map(\.id) }

        // Forward and backward pages, with `complete` at each end.
        let first = try await store.archivedMessages(in: alice, matching: ArchiveFilter(), limit: 10, fromEnd: false)
        XCTAssertEqual(ids(first), all[0..<10].map(\.id))
        XCTAssertFalse(first.complete)
        XCTAssertEqual(first.messages.first, ArchivedMessage(id: all[0].id, with: all[0].with, stanza: all[0].stanza), "bodies are not read back")
        let next = try await store.archivedMessages(in: alice, matching: ArchiveFilter(after: all[9].id), limit: 25, fromEnd: false)
        XCTAssertEqual(ids(next), all[10...].map(\.id))
        XCTAssertTrue(next.complete)
        let last = try await store.archivedMessages(in: alice, matching: ArchiveFilter(), limit: 10, fromEnd: true)
        XCTAssertEqual(ids(last), all[20...].map(\.id), "the last page, oldest first")
        XCTAssertFalse(last.complete)
        let earlier = try await store.archivedMessages(in: alice, matching: ArchiveFilter(before: all[20].id), limit: 20, fromEnd: true)
        XCTAssertEqual(ids(earlier), all[0..<20].map(\.id))
        XCTAssertTrue(earlier.complete)
        let exact = try await store.archivedMessages(in: alice, matching: ArchiveFilter(), limit: 30, fromEnd: false)
        XCTAssertTrue(exact.complete, "a page that ends exactly at the end is complete")

        // Filters: with (bare and full), time, between two ids, ids.
        let withBob = try await store.archivedMessages(in: alice, matching: ArchiveFilter(with: JID("bob@\(host)")!), limit: 50, fromEnd: false)
        XCTAssertEqual(ids(withBob), all.enumerated().filter { $0.offset % 3 == 0 }.map(\.element.id))
        let withPhone = try await store.archivedMessages(in: alice, matching: ArchiveFilter(with: JID("bob@\(host)/phone")!), limit: 50, fromEnd: false)
        XCTAssertEqual(withPhone.messages.count, 10)
        let withTablet = try await store.archivedMessages(in: alice, matching: ArchiveFilter(with: JID("bob@\(host)/tablet")!), limit: 50, fromEnd: false)
        XCTAssertEqual(withTablet.messages, [])
        XCTAssertTrue(withTablet.complete)
        let window = ArchiveFilter(start: start.addingTimeInterval(5), end: start.addingTimeInterval(9))
        let timed = try await store.archivedMessages(in: alice, matching: window, limit: 50, fromEnd: false)
        XCTAssertEqual(ids(timed), all[5...9].map(\.id), "start and end are inclusive")
        let between = try await store.archivedMessages(in: alice, matching: ArchiveFilter(after: all[3].id, before: all[7].id), limit: 50, fromEnd: false)
        XCTAssertEqual(ids(between), all[4...6].map(\.id))
        let picked = try await store.archivedMessages(in: alice, matching: ArchiveFilter(ids: [all[12].id, all[2].id]), limit: 50, fromEnd: false)
        XCTAssertEqual(ids(picked), [all[2].id, all[12].id])
        let counted = try await store.archivedCount(in: alice, matching: ArchiveFilter(with: JID("carol@\(host)")!))
        XCTAssertEqual(counted, 20)

        // Which ids exist: a wrong random half is not the same id.
        let forged = StanzaID.make(stamp: StanzaID.parts(of: all[5].id)!.stamp, random: 1)
        let known = try await store.archivedIDs(in: alice, among: [all[5].id, forged, "not-an-id"])
        XCTAssertEqual(known, [all[5].id])
        let bounds = try await store.archiveBounds(of: alice)
        XCTAssertEqual(bounds?.first.id, all[0].id)
        XCTAssertEqual(bounds?.last.id, all[29].id)
        let none = try await store.archiveBounds(of: jid("nobody"))
        XCTAssertNil(none)

        if store.supportsFullTextSearch {
            let apples = try await store.archivedMessages(in: alice, matching: ArchiveFilter(text: "apple"), limit: 50, fromEnd: false)
            XCTAssertEqual(ids(apples), all.enumerated().filter { $0.offset % 2 == 0 }.map(\.element.id))
        }

        // Retention: trimming keeps the newest; purging removes the oldest; deletion everything.
        let trimmed = try await store.trimArchive(alice, keep: 25)
        XCTAssertEqual(trimmed, 5)
        let untouched = try await store.trimArchive(alice, keep: 100)
        XCTAssertEqual(untouched, 0)
        let purged = try await store.purgeArchives(host: host, user: "alice", before: start.addingTimeInterval(10))
        XCTAssertEqual(purged, 5)
        let remaining = try await store.archivedMessages(in: alice, matching: ArchiveFilter(), limit: 50, fromEnd: false)
        XCTAssertEqual(ids(remaining), all[10...].map(\.id))
        let everywhere = try await store.purgeArchives(host: host, user: nil, before: start.addingTimeInterval(12))
        XCTAssertEqual(everywhere, 3, "alice's two and other's one")
        try await store.deleteArchive(alice)
        let gone = try await store.archivedCount(in: alice, matching: ArchiveFilter())
        XCTAssertEqual(gone, 0)
    }

    func archivePreferences() async throws {
        let alice = jid("alice")
        let preferences = ArchivePreferences(defaultBehaviour: .roster, always: [jid("bob"), JID("carol@\(host)/desk")!], never: [JID(host)!])
        try await store.setArchivePreferences(preferences, of: alice)
        try await store.setArchivePreferences(ArchivePreferences(defaultBehaviour: .never), of: jid("dave"))
        var loaded = try await store.archivePreferences(host: host)
        XCTAssertEqual(loaded, [alice: preferences, jid("dave"): ArchivePreferences(defaultBehaviour: .never)])
        try await store.setArchivePreferences(ArchivePreferences(defaultBehaviour: .always), of: alice)
        try await store.setArchivePreferences(nil, of: jid("dave"))
        loaded = try await store.archivePreferences(host: host)
        XCTAssertEqual(loaded, [alice: ArchivePreferences(defaultBehaviour: .always)])

        // Deleting the account takes its archive and preferences.
        try await store.register(username: "alice", host: host, password: "p", iterations: 4096)
        _ = try await fill(alice, count: 3, start: Date())
        try await store.deleteAccount(username: "alice", host: host)
        let archived = try await store.archivedCount(in: alice, matching: ArchiveFilter())
        XCTAssertEqual(archived, 0)
        let left = try await store.archivePreferences(host: host)
        XCTAssertEqual(left, [:])
    }
}

extension SQLiteStoreConformanceTests {
    func testArchives() async throws { try await contract { try await $0.archives() } }
    func testArchivePreferences() async throws { try await contract { try await $0.archivePreferences() } }
}

extension PostgresStoreConformanceTests {
    func testArchives() async throws { try await contract { try await $0.archives() } }
    func testArchivePreferences() async throws { try await contract { try await $0.archivePreferences() } }
}
