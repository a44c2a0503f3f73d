import Foundation
import Logging
import StarlingAPI
import StarlingFAST
import StarlingConfig
import StarlingModules
import StarlingSASL
@testable import StarlingServer
import StarlingSQLite
import NIOConcurrencyHelpers
import XCTest

/// XEP-0484's token life cycle over a real SQLite store: issue, log in, rotate (the old token good until the
/// new one is used), expiry, invalidation, and tokens bound to their mechanism, client and channel.
final class FASTTokensTests: XCTestCase {
    var path = ""
    let juliet = JID("juliet@example.com")!
    let clock = NIOLockedValueBox(1_000_000)

    override func setUp() {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("starling-fast-\(UUID().uuidString).sqlite").path
    }

    override func tearDown() {
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) }
    }

    func withTokens(_ body: (FASTTokens, SQLiteStore) async throws -> Void) async throws {
        let store = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        try await store.register(username: "juliet", host: "example.com", password: "p", iterations: 4096)
        var settings = FASTConfiguration()
        settings.tokenLifetime = 1000
        settings.rotateAfter = 100
        let clock = self.clock
        let tokens = FASTTokens(store: store, key: FASTTokenKey(secret: Array("a key of sixteen+ bytes".utf8)), settings: settings,
                                now: { clock.withLockedValue { $0 } })
        do { try await body(tokens, store) } catch {
            await store.close()
            throw error
        }
        await store.close()
    }

    func login(_ tokens: FASTTokens, _ token: String, mechanism: String = "HT-SHA-256-NONE", client: String = "phone",
               binding: [UInt8] = [], invalidate: Bool = false) async throws -> FASTVerificationOutcome {
        try await tokens.verify(FASTVerification(user: juliet, client: client, mechanism: mechanism,
                                                 proof: HashedTokenMechanism.initiatorProof(token: token, channelBinding: binding),
                                                 channelBinding: binding, invalidate: invalidate))
    }

    func testIssueLogInRotateAndExpire() async throws {
        try await withTokens { tokens, store in
            let first = try await tokens.issue(FASTIssue(user: juliet, client: "phone", mechanism: "HT-SHA-256-NONE"))
            XCTAssertEqual(first.expiresAt, 1_001_000)
            var outcome = try await login(tokens, first.token)
            XCTAssertEqual(outcome, .success(responderProof: HashedTokenMechanism.responderProof(token: first.token, channelBinding: []), rotate: false))
            var stored = try await store.fastTokens(of: juliet, client: "phone")
            XCTAssertEqual(stored.map(\.slot), [.new], "nothing to retire and nothing to issue: the login only read")

            // Bound to the mechanism, the client and the proof.
            outcome = try await login(tokens, first.token, mechanism: "HT-SHA-256-ENDP")
            XCTAssertEqual(outcome, .failure(.notAuthorized))
            outcome = try await login(tokens, first.token, client: "laptop")
            XCTAssertEqual(outcome, .failure(.notAuthorized))
            outcome = try await login(tokens, first.token + "x")
            XCTAssertEqual(outcome, .failure(.notAuthorized))

            // Past rotate_after the login asks for a replacement; until the replacement is used both work.
            clock.withLockedValue { $0 += 150 }
            outcome = try await login(tokens, first.token)
            guard case .success(_, rotate: true) = outcome else { return XCTFail("no rotation: \(outcome)") }
            let second = try await tokens.issue(FASTIssue(user: juliet, client: "phone", mechanism: "HT-SHA-256-NONE"))
            XCTAssertNotEqual(second.token, first.token)
            outcome = try await login(tokens, first.token)
            guard case .success = outcome else { return XCTFail("the old token stops working before the new one is used") }
            outcome = try await login(tokens, second.token)
            XCTAssertEqual(outcome, .success(responderProof: HashedTokenMechanism.responderProof(token: second.token, channelBinding: []), rotate: false))
            outcome = try await login(tokens, first.token)
            XCTAssertEqual(outcome, .failure(.notAuthorized), "using the new token retired the old one")

            // Expired: refused as such, and forgotten.
            clock.withLockedValue { $0 += 2000 }
            outcome = try await login(tokens, second.token)
            XCTAssertEqual(outcome, .failure(.credentialsExpired))
            stored = try await store.fastTokens(of: juliet, client: "phone")
            XCTAssertEqual(stored, [])
        }
    }

    /// A client logging in with a token that still sits in the `new` slot and asking for another: the one it
    /// holds moves to `current` first, so the new token does not overwrite it before the client has it.
    func testAskingForATokenKeepsTheOneInUse() async throws {
        try await withTokens { tokens, store in
            let held = try await tokens.issue(FASTIssue(user: juliet, client: "phone", mechanism: "HT-SHA-256-NONE"))
            var request = FASTVerification(user: juliet, client: "phone", mechanism: "HT-SHA-256-NONE",
                                           proof: HashedTokenMechanism.initiatorProof(token: held.token, channelBinding: []), channelBinding: [], invalidate: false)
            request.requestsToken = true
            guard case .success = try await tokens.verify(request) else { return XCTFail("the held token") }
            _ = try await tokens.issue(FASTIssue(user: juliet, client: "phone", mechanism: "HT-SHA-256-NONE"))
            let slots = try await store.fastTokens(of: juliet, client: "phone").map(\.slot)
            XCTAssertEqual(Set(slots), [.current, .new])
            let outcome = try await login(tokens, held.token)
            guard case .success = outcome else { return XCTFail("the token the client held was overwritten: \(outcome)") }
        }
    }

    func testInvalidateAndChannelBinding() async throws {
        try await withTokens { tokens, _ in
            let bound = try await tokens.issue(FASTIssue(user: juliet, client: "phone", mechanism: "HT-SHA-256-ENDP"))
            let certificate: [UInt8] = Array(repeating: 7, count: 32)
            // The client saw another certificate than the server's own (a man in the middle's).
            let intercepted = HashedTokenMechanism.initiatorProof(token: bound.token, channelBinding: Array(repeating: 8, count: 32))
            var outcome = try await tokens.verify(FASTVerification(user: juliet, client: "phone", mechanism: "HT-SHA-256-ENDP", proof: intercepted,
                                                                   channelBinding: certificate, invalidate: false))
            XCTAssertEqual(outcome, .failure(.notAuthorized), "a proof bound to another certificate does not verify")
            outcome = try await login(tokens, bound.token, mechanism: "HT-SHA-256-ENDP", binding: certificate, invalidate: true)
            guard case .success = outcome else { return XCTFail("the token works once more to log itself out") }
            outcome = try await login(tokens, bound.token, mechanism: "HT-SHA-256-ENDP", binding: certificate)
            XCTAssertEqual(outcome, .failure(.notAuthorized))
        }
    }

    /// The key file is made once, private, and read again on the next start; a configured file wins.
    func testKeyFileIsMadeOnceAndPrivate() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("starling-fast-key-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let config = try StarlingConfiguration.parse(yaml: "data_dir: \(directory)\n", file: directory + "/starling.yaml", moduleCatalog: BuiltinModules.descriptors)
        let first = try FASTTokens.loadKey(config)
        let second = try FASTTokens.loadKey(config)
        let keyPath = directory + "/fast-token.key"
        let permissions = try FileManager.default.attributesOfItem(atPath: keyPath)[.posixPermissions] as? Int
        XCTAssertEqual(permissions, 0o600)
        XCTAssertEqual(first.token(host: "h", username: "u", client: "c", nonce: [1]), second.token(host: "h", username: "u", client: "c", nonce: [1]))
        try "another key, long enough\n".write(toFile: directory + "/mine.key", atomically: true, encoding: .utf8)
        let configured = try StarlingConfiguration.parse(yaml: "data_dir: \(directory)\nauth:\n  fast:\n    key_file: mine.key\n",
                                                         file: directory + "/starling.yaml", moduleCatalog: BuiltinModules.descriptors)
        XCTAssertNotEqual(try FASTTokens.loadKey(configured).token(host: "h", username: "u", client: "c", nonce: [1]),
                          first.token(host: "h", username: "u", client: "c", nonce: [1]))
    }
}
