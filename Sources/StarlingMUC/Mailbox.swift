import Synchronization

/// Runs one room's work one item at a time, in submission order, without a thread of its own: the
/// thread that submits to an idle room runs the work right away (no hop, no task), and whatever other
/// threads submit meanwhile queues behind it. Work submitted from inside running work (a policy hook
/// that sends to the same room) queues too, so nothing deadlocks. The queue is bounded: a flood into one
/// room is refused instead of growing memory.
final class Mailbox: Sendable {
    typealias Work = @Sendable () -> Void

    private struct State {
        var queue: [Work] = []
        var head = 0
        var running = false

        var count: Int { queue.count - head }

        mutating func pop() -> Work? {
            guard head < queue.count else { return nil }
            let work = queue[head]
            head += 1
            if head > 64 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
            return work
        }
    }

    private let state = Mutex(State())
    let limit: Int
    /// Items one submitting thread runs before it hands the rest to a task (so a busy room cannot keep
    /// one event loop from its other connections).
    private let batch: Int

    init(limit: Int = 4096, batch: Int = 256) {
        self.limit = limit
        self.batch = batch
    }

    private enum Outcome { case runNow, queued, full }

    /// Runs `work` now or after the work ahead of it. False when the queue is full (nothing is queued).
    @discardableResult
    func submit(_ work: @escaping Work) -> Bool {
        let outcome: Outcome = state.withLock { state in
            if state.running {
                guard state.count < limit else { return .full }
                state.queue.append(work)
                return .queued
            }
            state.running = true
            return .runNow
        }
        switch outcome {
        case .runNow:
            work()
            drain()
            return true
        case .queued:
            return true
        case .full:
            return false
        }
    }

    private func drain() {
        var ran = 0
        while true {
            let next: Work? = state.withLock { state in
                if let work = state.pop() { return work }
                state.running = false
                state.queue.removeAll(keepingCapacity: state.queue.capacity <= 64)
                state.head = 0
                return nil
            }
            guard let next else { return }
            next()
            ran += 1
            if ran >= batch {
                Task { self.drain() }
                return
            }
        }
    }
}
