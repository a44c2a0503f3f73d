import Foundation
import StarlingAPI
import StarlingStorage
import Synchronization

/// Writes archived messages off the stanza path: callers queue entries and go on delivering; one task
/// stores them in batches. The queue is bounded, and fair:
/// - a session whose messages pile up faster than storage takes them stops being read (backpressure
///   through `ModuleHost.holdReads`) until its backlog shrinks, so one flooding client slows only itself;
/// - when storage fails or falls behind everyone, the queue fills and new messages are delivered
///   without being archived (no stanza-id), counted in `dropped` and logged, instead of growing memory.
public final class ArchiveWriter: Sendable {
    public struct Entry: Sendable {
        public var archive: JID
        public var message: ArchivedMessage
        /// The session that sent the message, charged for it (backpressure).
        public var origin: JID?
        /// Checked against the account store before writing: incoming messages for accounts with no
        /// session here, which may not exist.
        public var verifyAccount: Bool

        public init(archive: JID, message: ArchivedMessage, origin: JID?, verifyAccount: Bool = false) {
            self.archive = archive
            self.message = message
            self.origin = origin
            self.verifyAccount = verifyAccount
        }
    }

    public struct Limits: Sendable {
        /// Entries queued at most; beyond, messages go unarchived.
        public var queued: Int
        /// Entries one session may have queued before its reads are held, and where they resume.
        public var perSessionHigh: Int
        public var perSessionLow: Int
        public var batch: Int

        public init(queued: Int = 10_000, perSessionHigh: Int = 256, perSessionLow: Int = 64, batch: Int = 500) {
            self.queued = queued
            self.perSessionHigh = perSessionHigh
            self.perSessionLow = perSessionLow
            self.batch = batch
        }
    }

    private struct State {
        var queue: [Entry] = []
        /// Entries taken for the batch being written (still counted against the bound).
        var writing = 0
        var running = false
        /// Storage failed on the last attempt: nobody is held while it is down.
        var failing = false
        var perSession: [JID: Int] = [:]
        var holds: [JID: any ReadHold] = [:]
        /// Waiting for the queue to empty (shutdown).
        var drained: [CheckedContinuation<Void, Never>] = []
        /// Entries accepted, and entries done with (written, or found to have no account), in order:
        /// whoever waits for `completed` to reach a value has seen everything queued before it.
        var submitted = 0
        var completed = 0
        var caughtUp: [(waiter: Int, target: Int, continuation: CheckedContinuation<Void, Never>)] = []
        var nextWaiter = 0
        var lastDropLog = 0.0
        var droppedSinceLog = 0
    }

    private let store: any ArchiveStore
    private let accounts: (any AccountStore)?
    private let host: any ModuleHost
    private let name: String
    private let limits: Limits
    /// Called after each batch with the archives it wrote to (retention by count hooks in here).
    private let written: @Sendable ([JID]) async -> Void
    private let state = Mutex(State())
    private let counters = Counters()

    final class Counters: Sendable {
        let written = Atomic<Int>(0)
        let dropped = Atomic<Int>(0)
        let failures = Atomic<Int>(0)
        let holds = Atomic<Int>(0)
    }

    public init(store: any ArchiveStore, accounts: (any AccountStore)?, host: any ModuleHost, name: String, limits: Limits = Limits(),
                written: @escaping @Sendable ([JID]) async -> Void = { _ in }) {
        self.store = store
        self.accounts = accounts
        self.host = host
        self.name = name
        self.limits = limits
        self.written = written
    }

    /// Queues a message's entries (one per archive it goes to), all or none. False when the queue is
    /// full: the caller delivers the message without stanza-ids.
    public func submit(_ entries: [Entry]) -> Bool {
        guard !entries.isEmpty else { return true }
        var hold: JID?
        var start = false
        let accepted = state.withLock { state -> Bool in
            guard state.queue.count + state.writing + entries.count <= limits.queued else {
                state.droppedSinceLog += entries.count
                return false
            }
            state.queue.append(contentsOf: entries)
            state.submitted += entries.count
            for entry in entries {
                guard let origin = entry.origin else { continue }
                let count = (state.perSession[origin] ?? 0) + 1
                state.perSession[origin] = count
                if count >= limits.perSessionHigh, !state.failing, state.holds[origin] == nil { hold = origin }
            }
            if !state.running {
                state.running = true
                start = true
            }
            return true
        }
        if !accepted {
            counters.dropped.add(entries.count, ordering: .relaxed)
            logDrops()
        }
        if let hold, let taken = host.holdReads(of: hold) {
            counters.holds.add(1, ordering: .relaxed)
            let duplicate = state.withLock { state -> Bool in
                guard state.holds[hold] == nil else { return true }
                state.holds[hold] = taken
                return false
            }
            if duplicate { taken.release() }
        }
        if start { Task { await self.run() } }
        return accepted
    }

    /// Waits until everything queued is written (or the task is cancelled).
    public func drain() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let done = state.withLock { state -> Bool in
                    guard state.running || !state.queue.isEmpty else { return true }
                    state.drained.append(continuation)
                    return false
                }
                if done { continuation.resume() }
            }
        } onCancel: {
            let waiting = state.withLock { state -> [CheckedContinuation<Void, Never>] in
                defer { state.drained = [] }
                return state.drained
            }
            for continuation in waiting { continuation.resume() }
        }
        let left = state.withLock { $0.queue.count + $0.writing }
        if left > 0 { host.log(.error, "\(name): \(left) message(s) were not archived before shutdown") }
    }

    /// Waits until everything queued so far is stored, for at most `timeout` seconds: a query right
    /// after a message sees it (read your writes), and a query while storage is down still answers.
    public func caughtUp(timeout: Double = 2) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let waiter = state.withLock { state -> Int? in
                guard state.completed < state.submitted else { return nil }
                state.nextWaiter += 1
                state.caughtUp.append((state.nextWaiter, state.submitted, continuation))
                return state.nextWaiter
            }
            guard let waiter else { return continuation.resume() }
            Task {
                try? await Task.sleep(for: .seconds(timeout))
                self.resumeCaughtUp { $0.waiter == waiter }
            }
        }
    }

    private func resumeCaughtUp(_ which: ((waiter: Int, target: Int, continuation: CheckedContinuation<Void, Never>)) -> Bool) {
        let ready = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            let ready = state.caughtUp.filter(which).map(\.continuation)
            state.caughtUp.removeAll(where: which)
            return ready
        }
        for continuation in ready { continuation.resume() }
    }

    public var statusCounters: [String: Int] {
        let queued = state.withLock { $0.queue.count + $0.writing }
        return [
            "archive_queued": queued, "archive_written": counters.written.load(ordering: .relaxed),
            "archive_dropped": counters.dropped.load(ordering: .relaxed), "archive_write_failures": counters.failures.load(ordering: .relaxed),
            "archive_read_holds": counters.holds.load(ordering: .relaxed),
        ]
    }

    private func run() async {
        var delay = 0.5
        while true {
            let batch = state.withLock { state -> [Entry] in
                let taken = Array(state.queue.prefix(limits.batch))
                state.queue.removeFirst(taken.count)
                state.writing = taken.count
                if taken.isEmpty { state.running = false }
                return taken
            }
            if batch.isEmpty {
                let waiting = state.withLock { state -> [CheckedContinuation<Void, Never>] in
                    defer { state.drained = [] }
                    return state.drained
                }
                for continuation in waiting { continuation.resume() }
                return
            }
            while true {
                do {
                    let kept = try await verified(batch)
                    try await store.archive(kept.map { ($0.archive, $0.message) })
                    counters.written.add(kept.count, ordering: .relaxed)
                    finished(batch)
                    await written(Array(Set(kept.map(\.archive))))
                    delay = 0.5
                    break
                } catch {
                    counters.failures.add(1, ordering: .relaxed)
                    host.log(.error, "\(name): cannot store \(batch.count) archived message(s), retrying in \(delay) s: \(error)")
                    failing()
                    try? await Task.sleep(for: .seconds(delay))
                    delay = min(delay * 2, 30)
                }
            }
        }
    }

    /// The batch without entries for accounts that do not exist (checked once per account).
    private func verified(_ batch: [Entry]) async throws -> [Entry] {
        guard let accounts, batch.contains(where: \.verifyAccount) else { return batch }
        var exists: [JID: Bool] = [:]
        for entry in batch where entry.verifyAccount && exists[entry.archive] == nil {
            exists[entry.archive] = try await accounts.accountExists(username: entry.archive.localpart ?? "", host: entry.archive.domainpart)
        }
        return batch.filter { !$0.verifyAccount || exists[$0.archive] == true }
    }

    /// Storage is down: holds would stall senders for as long as it lasts, so all go.
    private func failing() {
        let released = state.withLock { state -> [any ReadHold] in
            state.failing = true
            defer { state.holds = [:] }
            return Array(state.holds.values)
        }
        for hold in released { hold.release() }
    }

    private func finished(_ batch: [Entry]) {
        let completed = state.withLock { $0.completed } + batch.count
        defer { resumeCaughtUp { $0.target <= completed } }
        let released = state.withLock { state -> [any ReadHold] in
            state.writing = 0
            state.completed += batch.count
            state.failing = false
            var released: [any ReadHold] = []
            for entry in batch {
                guard let origin = entry.origin, let count = state.perSession[origin] else { continue }
                if count <= 1 { state.perSession[origin] = nil } else { state.perSession[origin] = count - 1 }
                if (state.perSession[origin] ?? 0) <= limits.perSessionLow, let hold = state.holds.removeValue(forKey: origin) {
                    released.append(hold)
                }
            }
            return released
        }
        for hold in released { hold.release() }
    }

    /// At most one log line per ten seconds about unarchived messages.
    private func logDrops() {
        let now = Date().timeIntervalSince1970
        let dropped = state.withLock { state -> Int? in
            guard now - state.lastDropLog >= 10 else { return nil }
            state.lastDropLog = now
            defer { state.droppedSinceLog = 0 }
            return state.droppedSinceLog
        }
        if let dropped {
            host.log(.warning, "\(name): the archive queue is full (storage is slow or down): \(dropped) message(s) delivered without being archived")
        }
    }
}
