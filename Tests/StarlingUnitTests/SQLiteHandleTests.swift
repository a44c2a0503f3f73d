import Foundation
import Logging
import SQLiteNIO
import StarlingAPI
@testable import StarlingSQLite
import XCTest

/// The connection beneath `SQLiteStore`: statements prepared once and reused, values round-tripped
/// exactly, and failures that name the statement and leave the connection usable.
final class SQLiteHandleTests: XCTestCase {
    var path = ""
    var handle = SQLiteHandle()

    override func setUpWithError() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("starling-handle-\(UUID().uuidString).sqlite").path
        handle = SQLiteHandle()
        try handle.open(path: path, busyTimeoutMilliseconds: 100)
        try handle.query("CREATE TABLE t (k TEXT PRIMARY KEY, i INTEGER, f REAL, b BLOB, n TEXT)")
    }

    override func tearDown() {
        handle.close()
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) }
    }

    func testValuesRoundTripAndAStatementIsReused() throws {
        let insert = "INSERT INTO t (k, i, f, b, n) VALUES (?, ?, ?, ?, ?)"
        try handle.query(insert, [.text("ünï\u{1F426}"), .integer(Int.min), .float(2.5), .blob(ByteBuffer(bytes: [0, 1, 255])), .null])
        // The same text again runs the kept statement, reset and with fresh bindings.
        try handle.query(insert, [.text(""), .integer(7), .float(-0.0), .blob(ByteBuffer()), .text("")])
        let rows = try handle.query("SELECT k, i, f, b, n, length(b) AS bytes FROM t ORDER BY i")
        XCTAssertEqual(rows.count, 2)
        XCTAssertEqual(rows[0].column("k")?.string, "ünï\u{1F426}")
        XCTAssertEqual(rows[0].column("i")?.integer, Int.min)
        XCTAssertEqual(rows[0].column("f")?.double, 2.5)
        XCTAssertEqual(rows[0].column("b")?.blob.map { Array(buffer: $0) }, [0, 1, 255])
        XCTAssertEqual(rows[0].column("n")?.isNull, true)
        // An empty string stays a string and an empty blob a (zero-length) blob: neither becomes NULL.
        XCTAssertEqual(rows[1].column("k")?.string, "")
        XCTAssertEqual(rows[1].column("n")?.string, "")
        XCTAssertEqual(rows[1].column("bytes")?.integer, 0)
        XCTAssertNil(rows[1].column("no such column"))
        XCTAssertEqual(try handle.query("SELECT COUNT(*) AS n FROM t WHERE i = ?", [.integer(7)]).first?.column("n")?.integer, 1)
    }

    func testFailuresNameTheStatementAndLeaveTheConnectionUsable() throws {
        try handle.query("INSERT INTO t (k) VALUES (?)", [.text("a")])
        // A constraint failure inside a kept statement: the statement is reset, so it runs again.
        XCTAssertThrowsError(try handle.query("INSERT INTO t (k) VALUES (?)", [.text("a")])) { error in
            XCTAssertTrue("\(error)".contains("UNIQUE constraint failed"), "\(error)")
            XCTAssertTrue("\(error)".contains("INSERT INTO t (k) VALUES (?)"), "\(error)")
        }
        try handle.query("INSERT INTO t (k) VALUES (?)", [.text("b")])
        XCTAssertThrowsError(try handle.query("SELEKT 1")) { XCTAssertTrue("\($0)".contains("syntax error"), "\($0)") }
        XCTAssertThrowsError(try handle.query("SELECT ?", [])) { XCTAssertTrue("\($0)".contains("0 values"), "\($0)") }
        XCTAssertThrowsError(try handle.query("DELETE FROM t; DROP TABLE t")) { XCTAssertTrue("\($0)".contains("more than one statement"), "\($0)") }
        XCTAssertThrowsError(try handle.query("  -- nothing\n")) { XCTAssertTrue("\($0)".contains("no statement"), "\($0)") }
        XCTAssertEqual(try handle.query("SELECT k FROM t ORDER BY k").map { $0.column("k")?.string }, ["a", "b"])
    }

    func testATransactionThatThrowsLeavesNothing() throws {
        struct Refused: Error {}
        XCTAssertThrowsError(try handle.transaction {
            try handle.query("INSERT INTO t (k) VALUES ('gone')")
            throw Refused()
        })
        try handle.transaction { try handle.query("INSERT INTO t (k) VALUES ('kept')") }
        XCTAssertEqual(try handle.query("SELECT k FROM t").map { $0.column("k")?.string }, ["kept"])
    }

    func testStatementsBeyondTheCacheStillRun() throws {
        // Texts that differ (as an IN list of another length does) past the cache's limit are prepared
        // for their one use and finalized.
        for count in 1...(SQLiteHandle.statementCacheLimit + 10) {
            let list = Array(repeating: "?", count: count).joined(separator: ", ")
            let rows = try handle.query("SELECT \(count) AS n WHERE 1 IN (\(list))", Array(repeating: .integer(1), count: count))
            XCTAssertEqual(rows.first?.column("n")?.integer, count)
        }
    }

    func testAClosedHandleRefusesClearly() {
        handle.close()
        XCTAssertThrowsError(try handle.query("SELECT 1")) { XCTAssertTrue("\($0)".contains("closed"), "\($0)") }
    }
}

final class SQLiteStoreThreadTests: XCTestCase {
    func testOperationsAfterCloseFailClearlyAndConcurrentOnesAllLand() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("starling-thread-\(UUID().uuidString).sqlite").path
        defer { for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) } }
        let store = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        let user = JID("alice@example.com")!
        // Many operations at once, each a transaction: none may land inside another's.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<200 {
                group.addTask { _ = try await store.put(RosterItem(jid: JID("c\(index)@example.com")!, subscription: .none), for: user) }
            }
            try await group.waitForAll()
        }
        let roster = try await store.roster(of: user)
        XCTAssertEqual(roster.items.count, 200)
        XCTAssertEqual(roster.version, 200)
        await store.close()
        do {
            _ = try await store.roster(of: user)
            XCTFail("a closed store answered")
        } catch {
            XCTAssertTrue(error.description.contains("closed"), error.description)
        }
        await store.close()
    }
}

