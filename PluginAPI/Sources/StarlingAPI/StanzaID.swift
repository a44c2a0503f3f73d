import Foundation
import Synchronization

/// Unique, time-ordered identifiers for XEP-0359 stanza-ids and archive entries: 12 hex digits of
/// milliseconds since 1970 and 4 of a sequence (strictly increasing within a process), then 8 random
/// ones. Comparing two ids as strings compares their times, and ids made on two nodes of a cluster
/// (or after a restart) do not collide.
public enum StanzaID {
    private static let last = Atomic<UInt64>(0)

    public static func next(now: Date = Date()) -> String {
        let milliseconds = UInt64(max(0, now.timeIntervalSince1970 * 1000))
        var current = last.load(ordering: .relaxed)
        var stamp: UInt64
        repeat {
            stamp = max(milliseconds << 16, current &+ 1)
            let (exchanged, original) = last.compareExchange(expected: current, desired: stamp, ordering: .relaxed)
            if exchanged { break }
            current = original
        } while true
        let random = UInt32.random(in: 0...UInt32.max)
        return hex(stamp, digits: 16) + hex(UInt64(random), digits: 8)
    }

    /// The time an id was made (to the millisecond), or nil for something that is not one.
    public static func date(of id: String) -> Date? {
        guard id.utf8.count == 24, let stamp = UInt64(id.prefix(16), radix: 16) else { return nil }
        return Date(timeIntervalSince1970: Double(stamp >> 16) / 1000)
    }

    private static func hex(_ value: UInt64, digits: Int) -> String {
        let text = String(value, radix: 16)
        return String(repeating: "0", count: max(0, digits - text.count)) + text
    }
}
