import Foundation
import StarlingAPI
import StarlingModules
import StarlingSASL
import StarlingStorage

/// One account as another server exported or stored it, in the form every import reads into.
public struct ImportedAccount: Sendable {
    public var username: String
    public var host: String
    /// SCRAM keys as the other server kept them (hash, salt, iteration count and keys travel together).
    public var credentials: [SCRAMCredentials] = []
    /// A password kept in the clear by the other server: it becomes SCRAM keys here.
    public var password: String?
    public var roster: [RosterItem] = []
    /// Subscription requests the account has not answered yet.
    public var pending: [(from: JID, stanza: String)] = []
    /// Serialized messages, oldest first.
    public var offline: [String] = []
    public var vCard: XMLElement?
    public var privateDocuments: [XMLElement] = []
    public var blocklist: [JID] = []
    public var archive: [ArchivedMessage] = []
    /// What the source held for the account that is not imported, and why.
    public var skipped: [String] = []

    public init(username: String, host: String) {
        self.username = username
        self.host = host
    }
}

/// How an import treats what is already there, and whether it writes at all.
public struct ImportOptions: Sendable {
    /// Read and check everything, count what would be imported, write nothing.
    public var dryRun = false
    /// Replace accounts that exist already (deleting everything they own first) instead of skipping them.
    public var replace = false
    /// PBKDF2 iterations for keys made from passwords kept in the clear.
    public var iterations = 4096
    /// Called every `progressEvery` accounts with the count so far and the total.
    public var progress: (@Sendable (Int, Int) -> Void)?
    public var progressEvery = 1000

    public init() {}
}

/// What an import did (or, in a dry run, would do).
public struct ImportSummary: Sendable, CustomStringConvertible {
    public var dryRun = false
    public var accounts = 0
    public var rosterItems = 0
    public var pendingSubscriptions = 0
    public var vCards = 0
    public var offlineMessages = 0
    public var privateDocuments = 0
    public var blocklistItems = 0
    public var archivedMessages = 0
    /// Accounts not imported, with why.
    public var skippedAccounts: [(account: String, reason: String)] = []
    /// Data not imported, with why ("alice@example.org: privacy lists (not imported)").
    public var skippedData: [String] = []

    public var description: String {
        var lines = ["\(dryRun ? "would import" : "imported") \(accounts) account(s): \(rosterItems) roster item(s), \(pendingSubscriptions) pending subscription(s), "
            + "\(vCards) vCard(s), \(offlineMessages) offline message(s), \(privateDocuments) private document(s), \(blocklistItems) blocked JID(s), "
            + "\(archivedMessages) archived message(s)"]
        if !skippedAccounts.isEmpty {
            lines.append("skipped \(skippedAccounts.count) account(s):")
            lines += skippedAccounts.map { "  \($0.account): \($0.reason)" }
        }
        if !skippedData.isEmpty {
            lines.append("not imported:")
            lines += skippedData.map { "  \($0)" }
        }
        return lines.joined(separator: "\n")
    }
}

public struct ImportError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Writes imported accounts into a store: the one writer behind `starlingctl import` (XEP-0227, from
/// ejabberd and Starling) and `import-prosody`.
public enum AccountImport {
    /// Imports `accounts` one by one. An account that exists is skipped (or, with `replace`, replaced); one
    /// whose import fails halfway is deleted again before the error is thrown, so running the same import
    /// again carries on where it stopped.
    public static func run(_ accounts: [ImportedAccount], into store: any StarlingStore, hosts: [String],
                           options: ImportOptions) async throws -> ImportSummary {
        var summary = ImportSummary()
        summary.dryRun = options.dryRun
        for (index, account) in accounts.enumerated() {
            if let progress = options.progress, index > 0, index % options.progressEvery == 0 { progress(index, accounts.count) }
            let name = "\(account.username)@\(account.host)"
            guard hosts.contains(account.host) else {
                summary.skippedAccounts.append((name, "\(account.host) is not a host of this server (hosts: \(hosts.joined(separator: ", ")))"))
                continue
            }
            guard let user = try? JID(localpart: account.username, domainpart: account.host) else {
                summary.skippedAccounts.append((name, "not a valid JID"))
                continue
            }
            guard !account.credentials.isEmpty || account.password != nil else {
                summary.skippedAccounts.append((name, "no password or SCRAM keys to log in with"))
                continue
            }
            if try await store.accountExists(username: user.localpart!, host: user.domainpart) {
                guard options.replace else {
                    summary.skippedAccounts.append((name, "already present (use --replace to replace it)"))
                    continue
                }
                if !options.dryRun { try await store.deleteAccount(username: user.localpart!, host: user.domainpart) }
            }
            if !options.dryRun {
                do { try await write(account, user: user, store: store, iterations: options.iterations) } catch {
                    try? await store.deleteAccount(username: user.localpart!, host: user.domainpart)
                    throw ImportError("\(name): \(error) (the account was removed again; nothing else was changed)")
                }
            }
            summary.accounts += 1
            summary.rosterItems += account.roster.count
            summary.pendingSubscriptions += account.pending.count
            summary.vCards += account.vCard == nil ? 0 : 1
            summary.offlineMessages += account.offline.count
            summary.privateDocuments += account.privateDocuments.count
            summary.blocklistItems += account.blocklist.count
            summary.archivedMessages += account.archive.count
            summary.skippedData += account.skipped.map { "\(name): \($0)" }
        }
        if let progress = options.progress, accounts.count >= options.progressEvery { progress(accounts.count, accounts.count) }
        return summary
    }

    private static func write(_ account: ImportedAccount, user: JID, store: any StarlingStore, iterations: Int) async throws {
        var credentials = account.credentials
        if credentials.isEmpty, let password = account.password {
            credentials = SCRAMHash.allCases.map { SCRAMCredentials.generate(password: password, hash: $0, iterations: iterations) }
        }
        try await store.createAccount(username: user.localpart!, host: user.domainpart, credentials: credentials)
        for item in account.roster { _ = try await store.put(item, for: user) }
        for request in account.pending { try await store.addPendingSubscription(from: request.from, to: user, stanza: request.stanza) }
        for message in account.offline { _ = try await store.storeOffline(message, for: user, limit: Int.max) }
        if let vCard = account.vCard {
            try await store.setVCard(vCard.serialized(), photoHash: VCardModule.photoHash(vCard), of: user)
        }
        for document in account.privateDocuments {
            try await store.setPrivateXML(document.serialized(), of: user, name: document.name, namespace: document.namespace)
        }
        if !account.blocklist.isEmpty { try await store.block(account.blocklist, for: user) }
        var batch: [(archive: JID, message: ArchivedMessage)] = []
        for message in account.archive {
            batch.append((user, message))
            if batch.count == 1000 {
                try await store.archive(batch)
                batch = []
            }
        }
        if !batch.isEmpty { try await store.archive(batch) }
    }

    /// An archive id for a message another server archived at `date`: ids sort by time, and `sequence`
    /// keeps messages of one second in the order they came.
    public static func archiveID(at date: Date, sequence: UInt64) -> String {
        StanzaID.make(stamp: StanzaID.firstStamp(at: date) | (sequence & 0xFFFF), random: UInt32.random(in: 0...UInt32.max))
    }
}

/// SCRAM keys as other servers write them: base64 (XEP-0227), base64 of base64 (ejabberd's export), or hex
/// (Prosody's storage).
public enum ImportedKeys {
    /// The key's bytes, if `text` encodes `length` bytes in one of those forms.
    public static func key(_ text: String, length: Int) -> [UInt8]? {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        if let once = Data(base64Encoded: trimmed) {
            if once.count == length { return Array(once) }
            if let twice = Data(base64Encoded: String(decoding: once, as: UTF8.self)), twice.count == length { return Array(twice) }
        }
        if trimmed.count == length * 2, let bytes = hex(trimmed) { return bytes }
        return nil
    }

    /// The salt's bytes: base64 (once or, as ejabberd exports, twice: `doubled`).
    public static func salt(_ text: String, doubled: Bool) -> [UInt8]? {
        guard let once = Data(base64Encoded: text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return nil }
        guard doubled else { return Array(once) }
        return Data(base64Encoded: String(decoding: once, as: UTF8.self)).map(Array.init)
    }

    /// Whether `text` is base64 of the base64 text of a `length`-byte key (ejabberd's export).
    public static func isDoubled(_ text: String, length: Int) -> Bool {
        guard let once = Data(base64Encoded: text.trimmingCharacters(in: .whitespacesAndNewlines)), once.count != length else { return false }
        return Data(base64Encoded: String(decoding: once, as: UTF8.self))?.count == length
    }

    static func hex(_ text: String) -> [UInt8]? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.count / 2)
        var iterator = text.utf8.makeIterator()
        while let high = iterator.next() {
            guard let low = iterator.next(), let h = nibble(high), let l = nibble(low) else { return nil }
            bytes.append(h << 4 | l)
        }
        return bytes
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
