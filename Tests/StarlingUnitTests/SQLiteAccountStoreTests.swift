import Foundation
import Logging
import StarlingSASL
import StarlingSQLite
import XCTest

/// The account-store contract, on the embedded backend.
final class SQLiteAccountStoreTests: XCTestCase {
    var path: String!

    override func setUp() {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("starling-store-\(UUID().uuidString).sqlite").path
    }

    override func tearDown() {
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) }
    }

    func testAccountLifecycle() async throws {
        let store = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        try await store.register(username: "alice", host: "example.com", password: "one", iterations: 4096)
        let credentials = try await store.credentials(username: "alice", host: "example.com")
        XCTAssertEqual(Set(credentials?.map(\.hash) ?? []), [.sha1, .sha256])
        XCTAssertTrue(credentials?.allSatisfy { $0.verify(password: "one") } ?? false)
        let missing = try await store.credentials(username: "alice", host: "other.example")
        XCTAssertNil(missing, "accounts are per host")

        do {
            try await store.register(username: "alice", host: "example.com", password: "two", iterations: 4096)
            XCTFail("duplicate account")
        } catch { XCTAssertEqual(error, .accountExists) }

        try await store.changePassword(username: "alice", host: "example.com", password: "two", iterations: 4096)
        let changed = try await store.credentials(username: "alice", host: "example.com")
        XCTAssertEqual(changed?.count, 2)
        XCTAssertTrue(changed?.allSatisfy { $0.verify(password: "two") && !$0.verify(password: "one") } ?? false)

        try await store.register(username: "bob", host: "example.com", password: "b", iterations: 4096)
        let listed = try await store.accounts(host: "example.com")
        XCTAssertEqual(listed, ["alice", "bob"])
        try await store.deleteAccount(username: "alice", host: "example.com")
        let afterDelete = try await store.credentials(username: "alice", host: "example.com")
        XCTAssertNil(afterDelete)
        do {
            try await store.deleteAccount(username: "alice", host: "example.com")
            XCTFail("deleting twice")
        } catch { XCTAssertEqual(error, .accountNotFound) }
        do {
            try await store.changePassword(username: "nobody", host: "example.com", password: "x", iterations: 4096)
            XCTFail("changing a missing account")
        } catch { XCTAssertEqual(error, .accountNotFound) }
        await store.close()

        // Reopening runs the migrations again harmlessly and keeps the data.
        let reopened = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        let kept = try await reopened.accounts(host: "example.com")
        XCTAssertEqual(kept, ["bob"])
        await reopened.close()
    }

    func testConcurrentRegistrationsDoNotInterleaveTransactions() async throws {
        let store = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        let credentials = [SCRAMCredentials.generate(password: "p", hash: .sha256, iterations: 4096)]
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<50 {
                group.addTask { try await store.createAccount(username: "user\(index)", host: "example.com", credentials: credentials) }
            }
            try await group.waitForAll()
        }
        let count = try await store.accounts(host: "example.com").count
        XCTAssertEqual(count, 50)
        await store.close()
    }

    func testUnopenableDatabaseIsAClearError() async {
        do {
            _ = try await SQLiteStore.open(path: "/nonexistent-dir/x/y.sqlite", logger: Logger(label: "test"))
            XCTFail("opened an impossible path")
        } catch {
            XCTAssertTrue(error.description.contains("/nonexistent-dir/x/y.sqlite"), error.description)
        }
    }
}
