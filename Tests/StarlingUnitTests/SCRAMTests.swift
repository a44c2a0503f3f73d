import Foundation
import StarlingSASL
import XCTest

final class SCRAMTests: XCTestCase {
    struct Vector {
        let hash: SCRAMHash
        let clientNonce: String
        let serverNonce: String
        let salt: String
        let clientFirst: String
        let serverFirst: String
        let clientFinal: String
        let serverFinal: String
    }

    /// RFC 5802 §5 and RFC 7677 §3 (user "user", password "pencil", 4096 iterations).
    let vectors = [
        Vector(hash: .sha1, clientNonce: "fyko+d2lbbFgONRv9qkxdawL", serverNonce: "3rfcNHYJY1ZVvWVs7j",
               salt: "QSXCR+Q6sek8bf92",
               clientFirst: "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
               serverFirst: "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
               clientFinal: "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
               serverFinal: "v=rmF9pqV8S7suAoZWja4dJRkFsKQ="),
        Vector(hash: .sha256, clientNonce: "rOprNGfwEbeRWgbNEkqO", serverNonce: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
               salt: "W22ZaJ0SNY7soEsUEjb6gQ==",
               clientFirst: "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
               serverFirst: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
               clientFinal: "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
               serverFinal: "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
    ]

    private func credentials(_ vector: Vector, password: String = "pencil") -> SCRAMCredentials {
        SCRAMCredentials.derive(password: password, hash: vector.hash, salt: Array(Data(base64Encoded: vector.salt)!), iterations: 4096)
    }

    func testServerReproducesRFCVectors() {
        for vector in vectors {
            var server = SCRAMServer(hash: vector.hash, plus: false, channelBinding: nil, advertisedPlus: false, serverNonce: vector.serverNonce)
            XCTAssertEqual(server.receiveClientFirst(Array(vector.clientFirst.utf8)), .lookUpCredentials(username: "user", authzid: nil))
            XCTAssertEqual(server.receiveCredentials(credentials(vector)), .challenge(Array(vector.serverFirst.utf8)))
            XCTAssertEqual(server.receiveClientFinal(Array(vector.clientFinal.utf8)),
                           .success(additionalData: Array(vector.serverFinal.utf8), username: "user", authzid: nil))
        }
    }

    func testClientReproducesRFCVectors() throws {
        for vector in vectors {
            var client = SCRAMClient(hash: vector.hash, username: "user", password: "pencil", clientNonce: vector.clientNonce)
            XCTAssertEqual(String(decoding: client.clientFirst(), as: UTF8.self), vector.clientFirst)
            let final = try client.clientFinal(serverFirst: Array(vector.serverFirst.utf8))
            XCTAssertEqual(String(decoding: final, as: UTF8.self), vector.clientFinal)
            XCTAssertNoThrow(try client.verify(serverFinal: Array(vector.serverFinal.utf8)))
            XCTAssertThrowsError(try client.verify(serverFinal: Array("v=AAAA".utf8)))
        }
    }

    func testWrongPasswordAndUnknownUserFailAlike() {
        for vector in vectors {
            for stored in [credentials(vector, password: "not pencil"), nil] {
                var server = SCRAMServer(hash: vector.hash, plus: false, channelBinding: nil, advertisedPlus: false, serverNonce: vector.serverNonce)
                _ = server.receiveClientFirst(Array(vector.clientFirst.utf8))
                guard case .challenge = server.receiveCredentials(stored) else { return XCTFail("no challenge") }
                XCTAssertEqual(server.receiveClientFinal(Array(vector.clientFinal.utf8)), .fail(.notAuthorized))
            }
        }
    }

    func testChannelBindingRules() throws {
        let binding = ChannelBinding(type: "tls-server-end-point", data: Array(repeating: 7, count: 32))
        let stored = SCRAMCredentials.derive(password: "pw", hash: .sha256, salt: [1, 2, 3, 4], iterations: 4096)

        func run(clientBinding: ChannelBinding?, serverPlus: Bool, advertised: Bool, clientCouldBind: Bool = false) throws -> SCRAMServer.Step {
            var client = SCRAMClient(hash: .sha256, username: "u", password: "pw", channelBinding: clientBinding, supportsChannelBinding: clientCouldBind)
            var server = SCRAMServer(hash: .sha256, plus: serverPlus, channelBinding: binding, advertisedPlus: advertised)
            switch server.receiveClientFirst(client.clientFirst()) {
            case .fail(let failure): return .fail(failure)
            case .lookUpCredentials: break
            }
            guard case .challenge(let challenge) = server.receiveCredentials(stored) else { return .fail(.malformedRequest) }
            return server.receiveClientFinal(try client.clientFinal(serverFirst: challenge))
        }

        guard case .success = try run(clientBinding: binding, serverPlus: true, advertised: true) else { return XCTFail("PLUS with the right binding") }
        XCTAssertEqual(try run(clientBinding: ChannelBinding(type: "tls-server-end-point", data: [9]), serverPlus: true, advertised: true), .fail(.notAuthorized))
        XCTAssertEqual(try run(clientBinding: ChannelBinding(type: "tls-unique", data: [9]), serverPlus: true, advertised: true), .fail(.notAuthorized), "unsupported type")
        guard case .success = try run(clientBinding: nil, serverPlus: false, advertised: true) else { return XCTFail("non-PLUS with 'n'") }
        // 'y' means the client could bind but thinks we can't: a downgrade when we advertised -PLUS.
        XCTAssertEqual(try run(clientBinding: nil, serverPlus: false, advertised: true, clientCouldBind: true), .fail(.notAuthorized))
        guard case .success = try run(clientBinding: nil, serverPlus: false, advertised: false, clientCouldBind: true) else { return XCTFail("'y' without PLUS on offer") }
        XCTAssertEqual(try run(clientBinding: nil, serverPlus: true, advertised: true), .fail(.malformedRequest), "PLUS needs p=")
    }

    func testMalformedMessages() {
        for message in ["", "n", "x,,n=u,r=abc", "n,,r=abc", "n,,n=u", "n,,m=ext,n=u,r=abc", "n,a=bad=name,n=u,r=abc", "n,,n=u,r=a,b"] {
            var server = SCRAMServer(hash: .sha256, plus: false, channelBinding: nil, advertisedPlus: false)
            if case .lookUpCredentials = server.receiveClientFirst(Array(message.utf8)) {
                XCTFail("\(message) was accepted")
            }
        }
        var server = SCRAMServer(hash: .sha256, plus: false, channelBinding: nil, advertisedPlus: false)
        XCTAssertEqual(server.receiveClientFirst(Array("n,a=admin=2Cx,n=u=3Dv,r=abc".utf8)), .lookUpCredentials(username: "u=v", authzid: "admin,x"))
    }

    func testClientFinalNeedsAProofInBase64() throws {
        let stored = SCRAMCredentials.derive(password: "pw", hash: .sha256, salt: [1, 2, 3, 4], iterations: 4096)
        func final(_ edit: (String) -> String) throws -> SCRAMServer.Step {
            var client = SCRAMClient(hash: .sha256, username: "u", password: "pw", channelBinding: nil, supportsChannelBinding: false)
            var server = SCRAMServer(hash: .sha256, plus: false, channelBinding: nil, advertisedPlus: false)
            _ = server.receiveClientFirst(client.clientFirst())
            guard case .challenge(let challenge) = server.receiveCredentials(stored) else { return .fail(.malformedRequest) }
            let message = String(decoding: try client.clientFinal(serverFirst: challenge), as: UTF8.self)
            return server.receiveClientFinal(Array(edit(message).utf8))
        }
        guard case .success = try final({ $0 }) else { return XCTFail("the client's own final message") }
        XCTAssertEqual(try final { $0.replacingOccurrences(of: ",p=", with: ",q=") }, .fail(.malformedRequest), "no proof")
        XCTAssertEqual(try final { $0 + "!" }, .fail(.incorrectEncoding), "a proof that is not base64")
        XCTAssertEqual(try final { $0.replacingOccurrences(of: ",p=", with: ",p=AAAA") }, .fail(.notAuthorized), "another proof")
        var server = SCRAMServer(hash: .sha256, plus: false, channelBinding: nil, advertisedPlus: false)
        _ = server.receiveClientFirst(Array("n,,n=u,r=abc".utf8))
        _ = server.receiveCredentials(stored)
        XCTAssertEqual(server.receiveClientFinal([0xFF, 0x2C, 0x70, 0x3D]), .fail(.incorrectEncoding), "not UTF-8")
    }

    func testPlainParsingAndPasswordVerification() throws {
        let message = try PLAINMessage(parsing: Array("\0alice\0s3cret".utf8))
        XCTAssertEqual(message.username, "alice")
        XCTAssertNil(message.authzid)
        XCTAssertThrowsError(try PLAINMessage(parsing: Array("alice\0s3cret".utf8)))
        XCTAssertThrowsError(try PLAINMessage(parsing: Array("\0\0s3cret".utf8)))
        let stored = SCRAMCredentials.generate(password: "s3cret", hash: .sha256, iterations: 4096)
        XCTAssertTrue(stored.verify(password: "s3cret"))
        XCTAssertFalse(stored.verify(password: "s3cret "))
        XCTAssertEqual(stored.salt.count, 16)
        XCTAssertNotEqual(stored.salt, SCRAMCredentials.generate(password: "s3cret", hash: .sha256, iterations: 4096).salt)
    }

    /// draft-schmaus-kitten-sasl-ht: the proofs are HMAC-SHA-256 keyed with the token (values from Python's
    /// hmac module), the message is `authcid NUL proof` with a proof that may hold NULs itself.
    func testHashedTokenProofsAndMessage() throws {
        let token = "secret-token:fast-test"
        XCTAssertEqual(hex(HashedTokenMechanism.initiatorProof(token: token, channelBinding: [])),
                       "2557ec47cc92b6229759561fbc27ea66839a823f81d1d66a0d214d4086d6f15e")
        XCTAssertEqual(hex(HashedTokenMechanism.responderProof(token: token, channelBinding: Array(repeating: 42, count: 32))),
                       "159f3ff399e5a150f566dc0f4c2f155adfe37c5b72b79a2c1ff7e76abb4fc225")
        let proof: [UInt8] = [0, 1] + Array(repeating: 0, count: 30)
        let message = try HashedTokenMessage(parsing: Array("juliet".utf8) + [0] + proof)
        XCTAssertEqual(message.username, "juliet")
        XCTAssertEqual(message.proof, proof)
        XCTAssertThrowsError(try HashedTokenMessage(parsing: [0] + proof), "no username")
        XCTAssertThrowsError(try HashedTokenMessage(parsing: Array("juliet".utf8) + [0, 1, 2]), "short proof")
        XCTAssertThrowsError(try HashedTokenMessage(parsing: Array("juliet".utf8)), "no separator")
        XCTAssertFalse(HashedTokenMechanism.verify(proof: proof, token: token, channelBinding: []))
        XCTAssertTrue(HashedTokenMechanism.verify(proof: HashedTokenMechanism.initiatorProof(token: token, channelBinding: [7]), token: token, channelBinding: [7]))
        XCTAssertFalse(HashedTokenMechanism.verify(proof: HashedTokenMechanism.initiatorProof(token: token, channelBinding: [7]), token: token, channelBinding: [8]),
                       "bound to the channel")
    }

    /// A FAST token is a function of the server key and everything its row names: another key, account,
    /// client or nonce gives another token.
    func testFASTTokensAreDerivedFromTheKeyAndTheirRow() {
        let key = FASTTokenKey(secret: Array("0123456789abcdef-key".utf8))
        let nonce: [UInt8] = Array(repeating: 5, count: 32)
        let token = key.token(host: "example.com", username: "juliet", client: "phone", nonce: nonce)
        XCTAssertEqual(token, FASTTokenKey(secret: Array("0123456789abcdef-key".utf8)).token(host: "example.com", username: "juliet", client: "phone", nonce: nonce))
        XCTAssertTrue(token.hasPrefix("fast-") && token.count == 48 && !token.contains("=") && !token.contains("/"), token)
        let others = [
            FASTTokenKey(secret: Array("0123456789abcdef-other".utf8)).token(host: "example.com", username: "juliet", client: "phone", nonce: nonce),
            key.token(host: "example.org", username: "juliet", client: "phone", nonce: nonce),
            key.token(host: "example.com", username: "romeo", client: "phone", nonce: nonce),
            key.token(host: "example.com", username: "juliet", client: "laptop", nonce: nonce),
            key.token(host: "example.com", username: "juliet", client: "phone", nonce: Array(repeating: 6, count: 32)),
        ]
        XCTAssertEqual(Set(others + [token]).count, 6)
    }

    private func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }
}
