import Foundation
import StarlingAPI
import StarlingStorage
import Synchronization

/// Writes archived messages off the stanza path: callers queue entries and go on delivering; a few
/// tasks store them in batches. The queue is bounded, and fair:
/// - a session whose entries pile up stops being read (backpressure through `ModuleHost.holdReads`)
///   until its backlog shrinks: past `perSessionHigh` entries always, and past `perSessionBusy` once
///   the queue is half full, so heavy senders slow down to what storage takes and light ones never wait;
/// - when storage fails, holds are released (nobody waits on an outage), the queue fills, and new
///   messages are delivered without being archived (no stanza-id), counted in `dropped` and logged,
///   instead of growing memory.
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
        /// Entries queued (or being written) at most; beyond, messages go unarchived.
        public var queued: Int
        /// Entries one session may have queued before its reads are held; `perSessionBusy` once the
        /// queue is half full; reading resumes at `perSessionLow`.
        public var perSessionHigh: Int
        public var perSessionBusy: Int
        public var perSessionLow: Int
        public var batch: Int
        /// Milliseconds a writer waits for more entries when less than a batch is queued.
        public var linger: Int

        public init(queued: Int = 10_000, perSessionHigh: Int = 256, perSessionBusy: Int = 32, perSessionLow: Int = 8, batch: Int = 500,
                    linger: Int = 10) {
            self.queued = queued
            self.perSessionHigh = perSessionHigh
            self.perSessionBusy = perSessionBusy
            self.perSessionLow = perSessionLow
            self.batch = batch
            self.linger = linger
        }
    }

    private struct Queued {
        var entry: Entry
        /// Position in submission order.
        var sequence: Int
    }

    private struct State {
        /// Pending entries from `head` on (the consumed front is dropped now and then).
        var queue: [Queued] = []
        var head = 0
        var pending: Int { queue.count - head }
        /// Batches being written: first sequence → size.
        var writing: [Int: Int] = [:]
        var writingCount = 0
        var workers = 0
        var nextSequence = 0
        /// Storage failed on the last attempt: nobody is held while it is down.
        var failing = false
        var perSession: [JID: Int] = [:]
        var holds: [JID: any ReadHold] = [:]
        /// Waiting for every entry before `target` to be done with.
        var waiters: [(id: Int, target: Int, continuation: CheckedContinuation<Void, Never>)] = []
        var nextWaiter = 0
        var lastDropLog = 0.0
        var droppedSinceLog = 0

        /// Every entry before this sequence is stored (or was found to have no account).
        var doneBefore: Int {
            let queuedFront = head < queue.count ? queue[head].sequence : nextSequence
            return min(queuedFront, writing.keys.min() ?? nextSequence)
        }
    }

    private let store: any ArchiveStore
    private let accounts: (any AccountStore)?
    private let host: any ModuleHost
    private let name: String
    private let limits: Limits
    private let concurrency: Int
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
        concurrency = max(1, store.concurrentArchiveWrites)
        self.written = written
    }

    /// Queues a message's entries (one per archive it goes to), all or none. False when the queue is
    /// full: the caller delivers the message without stanza-ids.
    public func submit(_ entries: [Entry]) -> Bool {
        guard !entries.isEmpty else { return true }
        var hold: JID?
        var start = false
        let accepted = state.withLock { state -> Bool in
            guard state.pending + state.writingCount + entries.count <= limits.queued else {
                state.droppedSinceLog += entries.count
                return false
            }
            for entry in entries {
                state.queue.append(Queued(entry: entry, sequence: state.nextSequence))
                state.nextSequence += 1
            }
            let busy = (state.pending + state.writingCount) * 2 >= limits.queued
            for entry in entries {
                guard let origin = entry.origin else { continue }
                let count = (state.perSession[origin] ?? 0) + 1
                state.perSession[origin] = count
                if count >= (busy ? limits.perSessionBusy : limits.perSessionHigh), !state.failing, state.holds[origin] == nil { hold = origin }
            }
            // One writer while a batch's worth is not waiting; more (up to `concurrency`) when it is.
            if state.workers == 0 || (state.workers < concurrency && state.pending >= limits.batch) {
                state.workers += 1
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
            let keep = state.withLock { state -> Bool in
                guard state.holds[hold] == nil, (state.perSession[hold] ?? 0) > limits.perSessionLow else { return false }
                state.holds[hold] = taken
                return true
            }
            if !keep { taken.release() }
        }
        if start { Task { await self.work() } }
        return accepted
    }

    /// Waits until everything queued so far is stored, for at most `timeout` seconds: a query right
    /// after a message sees it (read your writes), and a query while storage is down still answers.
    public func caughtUp(timeout: Double? = 2) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let waiter = state.withLock { state -> Int? in
                guard state.doneBefore < state.nextSequence else { return nil }
                state.nextWaiter += 1
                state.waiters.append((state.nextWaiter, state.nextSequence, continuation))
                return state.nextWaiter
            }
            guard let waiter else { return continuation.resume() }
            guard let timeout else { return }
            Task {
                try? await Task.sleep(for: .seconds(timeout))
                self.resumeWaiters { $0.id == waiter }
            }
        }
    }

    /// Waits until the queue is empty and written, or the task is cancelled (shutdown gives up).
    public func drain() async {
        await withTaskCancellationHandler {
            await caughtUp(timeout: nil)
        } onCancel: {
            resumeWaiters { _ in true }
        }
        let left = state.withLock { $0.pending + $0.writingCount }
        if left > 0 { host.log(.error, "\(name): \(left) message(s) were not archived before shutdown") }
    }

    public var statusCounters: [String: Int] {
        let queued = state.withLock { $0.pending + $0.writingCount }
        return [
            "archive_queued": queued, "archive_written": counters.written.load(ordering: .relaxed),
            "archive_dropped": counters.dropped.load(ordering: .relaxed), "archive_write_failures": counters.failures.load(ordering: .relaxed),
            "archive_read_holds": counters.holds.load(ordering: .relaxed),
        ]
    }

    private func resumeWaiters(_ which: ((id: Int, target: Int, continuation: CheckedContinuation<Void, Never>)) -> Bool) {
        let ready = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            let ready = state.waiters.filter(which).map(\.continuation)
            state.waiters.removeAll(where: which)
            return ready
        }
        for continuation in ready { continuation.resume() }
    }

    /// One writer: takes batches until the queue is empty. Up to `concurrency` run at once; ids order
    /// an archive, so batches may land in any order.
    private func work() async {
        var delay = 0.5
        while true {
            // A short wait gathers a trickle of messages into one batch: one statement and one commit
            // for many, instead of one each (the delay is the archive's, never delivery's).
            if state.withLock({ $0.pending < limits.batch }) { try? await Task.sleep(for: .milliseconds(limits.linger)) }
            let batch = state.withLock { state -> [Queued] in
                let taken = Array(state.queue[state.head..<min(state.queue.count, state.head + limits.batch)])
                state.head += taken.count
                if state.head > 4096 && state.head * 2 > state.queue.count {
                    state.queue.removeFirst(state.head)
                    state.head = 0
                }
                if let first = taken.first {
                    state.writing[first.sequence] = taken.count
                    state.writingCount += taken.count
                } else {
                    state.workers -= 1
                }
                return taken
            }
            guard let first = batch.first else { return }
            let entries = batch.map(\.entry)
            while true {
                do {
                    let kept = try await verified(entries)
                    try await store.archive(kept.map { ($0.archive, $0.message) })
                    counters.written.add(kept.count, ordering: .relaxed)
                    finished(entries, first: first.sequence)
                    await written(Array(Set(kept.map(\.archive))))
                    delay = 0.5
                    break
                } catch {
                    counters.failures.add(1, ordering: .relaxed)
                    host.log(.error, "\(name): cannot store \(entries.count) archived message(s), retrying in \(delay) s: \(error)")
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

    private func finished(_ batch: [Entry], first: Int) {
        let (released, doneBefore) = state.withLock { state -> ([any ReadHold], Int) in
            state.writing[first] = nil
            state.writingCount -= batch.count
            state.failing = false
            var released: [any ReadHold] = []
            for entry in batch {
                guard let origin = entry.origin, let count = state.perSession[origin] else { continue }
                state.perSession[origin] = count <= 1 ? nil : count - 1
                if count - 1 <= limits.perSessionLow, let hold = state.holds.removeValue(forKey: origin) { released.append(hold) }
            }
            return (released, state.doneBefore)
        }
        for hold in released { hold.release() }
        resumeWaiters { $0.target <= doneBefore }
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
