import Foundation
import StarlingAPI
import Synchronization

/// Uploaded files on disk for one host: `<directory>/<id>/<name>` with `<directory>/<id>.json` beside it,
/// written when the slot is handed out (it reserves the owner's quota) and completed by the PUT. The
/// directory may be shared by the nodes of a cluster (NFS, say); each node counts quotas from what it sees.
final class UploadFiles: Sendable {
    /// What `<id>.json` holds.
    struct Record: Codable, Sendable, Equatable {
        var owner: String
        var name: String
        var size: Int
        var contentType: String
        /// Seconds since 1970.
        var created: Int
        var slotExpires: Int
        var complete: Bool
    }

    enum StoreOutcome: Equatable {
        case stored
        case noSuchSlot
        case alreadyUploaded
        case sizeMismatch
    }

    let directory: URL
    /// Where a body's chunks are written: disk writes can wait on the device, and the task reading the
    /// body may run on an event loop (the server runs Swift concurrency on its event loops).
    private let disk = DispatchQueue(label: "starling.upload.disk")
    /// Bytes per owner (bare JID), completed and reserved.
    private let usage = Mutex<[String: Int]>([:])

    init(directory: URL) throws {
        self.directory = directory
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        var totals: [String: Int] = [:]
        for (_, record) in records() { totals[record.owner, default: 0] += record.size }
        usage.withLock { $0 = totals }
    }

    func usage(of owner: String) -> Int {
        usage.withLock { $0[owner] ?? 0 }
    }

    /// Reserves `slot` for `owner`, unless that takes the owner past `quota` bytes (0: no quota).
    func reserve(_ slot: UploadSlot, owner: String, quota: Int, now: Int) throws -> Bool {
        let admitted = usage.withLock { totals -> Bool in
            let used = totals[owner] ?? 0
            guard quota == 0 || used + slot.size <= quota else { return false }
            totals[owner] = used + slot.size
            return true
        }
        guard admitted else { return false }
        let record = Record(owner: owner, name: slot.filename, size: slot.size, contentType: slot.contentType, created: now,
                            slotExpires: slot.expires, complete: false)
        do { try write(record, id: slot.id) } catch {
            release(owner: owner, bytes: slot.size)
            throw error
        }
        return true
    }

    /// The record of a slot id, if it is a well-formed id that was handed out here.
    func record(id: String) -> Record? {
        guard Self.isSlotID(id), let data = try? Data(contentsOf: recordURL(id)) else { return nil }
        return try? JSONDecoder().decode(Record.self, from: data)
    }

    /// Where a completed upload's bytes are.
    func fileURL(id: String, name: String) -> URL {
        directory.appendingPathComponent(id).appendingPathComponent(name)
    }

    /// Writes the PUT's body for slot `id`; exactly `record.size` bytes are accepted.
    func store(id: String, body: ModuleHTTPBody) async throws -> StoreOutcome {
        guard var record = record(id: id) else { return .noSuchSlot }
        if record.complete { return .alreadyUploaded }
        let folder = directory.appendingPathComponent(id)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        // Written under a name no upload can have, then renamed: a GET never sees half a file.
        let partial = folder.appendingPathComponent(".partial-\(UUID().uuidString)")
        guard FileManager.default.createFile(atPath: partial.path, contents: nil), let handle = try? FileHandle(forWritingTo: partial) else {
            throw CocoaError(.fileWriteUnknown)
        }
        var written = 0
        do {
            defer { try? handle.close() }
            for try await chunk in body {
                written += chunk.count
                if written > record.size { break }
                try await write(chunk, to: handle)
            }
        } catch {
            try? FileManager.default.removeItem(at: partial)
            throw error
        }
        guard written == record.size else {
            try? FileManager.default.removeItem(at: partial)
            return .sizeMismatch
        }
        let final = fileURL(id: id, name: record.name)
        guard (try? FileManager.default.moveItem(at: partial, to: final)) != nil else {
            // Another PUT of the same slot finished first.
            try? FileManager.default.removeItem(at: partial)
            return .alreadyUploaded
        }
        record.complete = true
        try write(record, id: id)
        return .stored
    }

    private func write(_ chunk: [UInt8], to handle: FileHandle) async throws {
        try await withCheckedThrowingContinuation { (done: CheckedContinuation<Void, any Error>) in
            disk.async { done.resume(with: Result { try handle.write(contentsOf: chunk) }) }
        }
    }

    /// Removes uploads created more than `maxAge` seconds ago (0: keep them) and reservations whose slot
    /// expired without an upload; returns how many files went and how many bytes they freed.
    @discardableResult
    func purge(maxAge: Int, now: Int) -> (files: Int, bytes: Int) {
        var files = 0, bytes = 0
        for (id, record) in records() {
            let expired = record.complete ? (maxAge > 0 && record.created + maxAge < now) : record.slotExpires < now
            guard expired else { continue }
            try? FileManager.default.removeItem(at: directory.appendingPathComponent(id))
            try? FileManager.default.removeItem(at: recordURL(id))
            release(owner: record.owner, bytes: record.size)
            if record.complete {
                files += 1
                bytes += record.size
            }
        }
        return (files, bytes)
    }

    private func release(owner: String, bytes: Int) {
        usage.withLock { totals in
            totals[owner] = max(0, (totals[owner] ?? 0) - bytes)
        }
    }

    private func records() -> [(String, Record)] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        return names.compactMap { name -> (String, Record)? in
            guard name.hasSuffix(".json") else { return nil }
            let id = String(name.dropLast(5))
            return record(id: id).map { (id, $0) }
        }
    }

    private func recordURL(_ id: String) -> URL {
        directory.appendingPathComponent("\(id).json")
    }

    private func write(_ record: Record, id: String) throws {
        try JSONEncoder().encode(record).write(to: recordURL(id), options: .atomic)
    }

    /// 32 lower-case hex digits, as `UploadSlot.newID()` makes them: anything else never reaches the disk.
    static func isSlotID(_ id: String) -> Bool {
        id.utf8.count == 32 && id.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }
}
