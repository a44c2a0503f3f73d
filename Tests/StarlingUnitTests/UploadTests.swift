import Foundation
import StarlingAPI
@testable import StarlingModules
import XCTest

/// XEP-0363's slot signatures and the file store's reservations, quotas and expiry, without a server.
final class UploadStoreTests: XCTestCase {
    let slot = UploadSlot(host: "example.com", id: "0123456789abcdef0123456789abcdef", filename: "a b.txt", size: 5, contentType: "text/plain", expires: 1_000)

    func testSignaturesCoverEveryFactOfTheSlot() {
        let signer = UploadSlotSigner(secret: Array("a secret of enough bytes".utf8))
        let query = signer.putQuery(for: slot)
        XCTAssertTrue(query.hasPrefix("e=1000&h="))
        let signature = String(query.split(separator: "=", maxSplits: 2)[2])
        XCTAssertTrue(signer.accepts(slot, signature: signature, now: 999))
        XCTAssertTrue(signer.accepts(slot, signature: signature, now: 1_000))
        XCTAssertFalse(signer.accepts(slot, signature: signature, now: 1_001), "expired")
        for changed in [\UploadSlot.filename, \UploadSlot.contentType, \UploadSlot.id, \UploadSlot.host] {
            var other = slot
            other[keyPath: changed] += "x"
            XCTAssertFalse(signer.accepts(other, signature: signature, now: 0), "\(changed)")
        }
        var larger = slot
        larger.size += 1
        XCTAssertFalse(signer.accepts(larger, signature: signature, now: 0))
        XCTAssertFalse(UploadSlotSigner(secret: Array("another secret of bytes".utf8)).accepts(slot, signature: signature, now: 0))
        XCTAssertFalse(signer.accepts(slot, signature: "not base64 at all!", now: 0))
        XCTAssertEqual(UploadSlotSigner.path(of: slot), "/upload/example.com/0123456789abcdef0123456789abcdef/a%20b.txt")
    }

    func testFileNames() {
        XCTAssertNil(UploadSlot.problem(withFilename: "IMG_2026.jpg"))
        XCTAssertNil(UploadSlot.problem(withFilename: "ünï cödé.txt"))
        for bad in ["", ".", "..", "a/b", "a\\b", "tab\there", String(repeating: "x", count: 256)] {
            XCTAssertNotNil(UploadSlot.problem(withFilename: bad), bad)
        }
    }

    func testReservationsQuotasAndExpiry() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("upload-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: directory) }
        let files = try UploadFiles(directory: directory)
        XCTAssertTrue(try files.reserve(slot, owner: "a@example.com", quota: 8, now: 100))
        var second = slot
        second.id = UploadSlot.newID()
        XCTAssertFalse(try files.reserve(second, owner: "a@example.com", quota: 8, now: 100), "5 + 5 > 8")
        XCTAssertTrue(try files.reserve(second, owner: "b@example.com", quota: 8, now: 100), "quotas are per owner")

        let body = ModuleHTTPBody {
            var chunks = [[UInt8]("hel".utf8), [UInt8]("lo".utf8)].makeIterator()
            return { chunks.next() }
        }
        let stored = try await files.store(id: slot.id, body: body)
        XCTAssertEqual(stored, .stored)
        XCTAssertEqual(try Data(contentsOf: files.fileURL(id: slot.id, name: slot.filename)), Data("hello".utf8))
        let again = try await files.store(id: slot.id, body: body)
        XCTAssertEqual(again, .alreadyUploaded)
        let short = try await files.store(id: second.id, body: ModuleHTTPBody { var once = [[UInt8]("hi".utf8)].makeIterator(); return { once.next() } })
        XCTAssertEqual(short, .sizeMismatch)
        let outside = try await files.store(id: "../../etc", body: .empty)
        XCTAssertEqual(outside, .noSuchSlot)

        // A new store over the same folder counts the same usage.
        XCTAssertEqual(try UploadFiles(directory: directory).usage(of: "a@example.com"), 5)

        // b's slot expired at 1,000 without an upload; a's file is 900 seconds old at 1,000.
        XCTAssertEqual(files.purge(maxAge: 1_000, now: 1_001).files, 0)
        XCTAssertEqual(files.usage(of: "b@example.com"), 0, "the lapsed reservation is released")
        XCTAssertEqual(files.usage(of: "a@example.com"), 5)
        XCTAssertEqual(files.purge(maxAge: 0, now: 1_000_000).files, 0, "0 keeps files")
        let purged = files.purge(maxAge: 1_000, now: 1_101)
        XCTAssertEqual(purged.files, 1)
        XCTAssertEqual(purged.bytes, 5)
        XCTAssertEqual(files.usage(of: "a@example.com"), 0)
        XCTAssertNil(files.record(id: slot.id))
        XCTAssertFalse(FileManager.default.fileExists(atPath: files.fileURL(id: slot.id, name: slot.filename).path))
    }
}
