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
        return make(stamp: stamp, random: UInt32.random(in: 0...UInt32.max))
    }

    /// The time an id was made (to the millisecond), or nil for something that is not one.
    public static func date(of id: String) -> Date? {
        parts(of: id).map { date(ofStamp: $0.stamp) }
    }

    /// An id's two halves: the stamp (milliseconds since 1970 shifted left by 16, plus the sequence),
    /// which orders ids by time, and the random part. Nil for anything that is not an id.
    public static func parts(of id: String) -> (stamp: UInt64, random: UInt32)? {
        guard id.utf8.count == 24, id.utf8.allSatisfy({ (48...57).contains($0) || (97...102).contains($0) }),
              let stamp = UInt64(id.prefix(16), radix: 16), let random = UInt32(id.suffix(8), radix: 16) else { return nil }
        return (stamp, random)
    }

    /// The id with these halves (see `parts(of:)`).
    public static func make(stamp: UInt64, random: UInt32) -> String {
        hex(stamp, digits: 16) + hex(UInt64(random), digits: 8)
    }

    /// The smallest stamp of `date`'s millisecond: ids made at or after `date` have a stamp at least this.
    public static func firstStamp(at date: Date) -> UInt64 {
        UInt64(max(0, (date.timeIntervalSince1970 * 1000).rounded(.down))) << 16
    }

    /// The largest stamp of `date`'s millisecond.
    public static func lastStamp(at date: Date) -> UInt64 {
        firstStamp(at: date) | 0xFFFF
    }

    public static func date(ofStamp stamp: UInt64) -> Date {
        Date(timeIntervalSince1970: Double(stamp >> 16) / 1000)
    }

    private static func hex(_ value: UInt64, digits: Int) -> String {
        let text = String(value, radix: 16)
        return String(repeating: "0", count: max(0, digits - text.count)) + text
    }
}
