import Foundation
import StarlingAPI
import StarlingTestClient
import XCTest
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// XEP-0363 on the real server: slots from upload.localhost, the PUT and GET on its HTTP listener, and
/// what is refused (too large, over quota, a forged or reused URL, the wrong size or type).
final class UploadTests: XCTestCase {
    static let users = [("up1", "pw1"), ("up2", "pw2"), ("up3", "pw3")]
    static let namespace = "urn:xmpp:http:upload:0"
    nonisolated(unsafe) static var server: ServerProcess!
    nonisolated(unsafe) static var startFailure: (any Error)?
    nonisolated(unsafe) static var httpPort = 0

    override class func setUp() {
        super.setUp()
        do {
            httpPort = try ServerProcess.freePort()
            server = try ServerProcess(extraConfig: """
            modules:
              disco: {}
              http_upload: { base_url: "http://127.0.0.1:\(httpPort)", max_file_size: 4000, quota: 6000 }
            """, users: users, extraListeners: ["{ type: http, address: 127.0.0.1, port: \(httpPort) }"])
        } catch {
            startFailure = error
        }
    }

    override func setUpWithError() throws {
        if let failure = Self.startFailure { throw failure }
    }

    override class func tearDown() {
        startFailure = nil
        XCTAssertEqual(server?.stop() ?? 0, 0)
        server = nil
        super.tearDown()
    }

    private func login(_ number: Int) async throws -> TestClient {
        try await TestClient.login(port: Self.server.directTLSPort, domain: "localhost", tls: .direct, username: "up\(number)", password: "pw\(number)",
                                   resource: "r")
    }

    /// Asks for a slot; returns the PUT and GET URLs, or the error element.
    private func slot(_ client: TestClient, _ filename: String, size: Int, type: String? = "text/plain") async throws -> (put: URL, get: URL)? {
        let id = UUID().uuidString
        let typeAttribute = type.map { " content-type='\($0)'" } ?? ""
        let reply = try await client.iq("<iq type='get' id='\(id)' to='upload.localhost'><request xmlns='\(Self.namespace)' filename='\(filename)' size='\(size)'\(typeAttribute)/></iq>", id: id)
        guard reply[attribute: "type"] == "result", let slot = reply.child("slot"),
              let put = slot.child("put")?[attribute: "url"].flatMap(URL.init(string:)), let get = slot.child("get")?[attribute: "url"].flatMap(URL.init(string:)) else {
            lastError = reply.child("error")
            return nil
        }
        return (put, get)
    }
    private var lastError: XMLElement?

    private func put(_ url: URL, _ body: Data, type: String? = "text/plain", length: Int? = nil) async throws -> Int {
        var request = URLRequest(url: url)
        request.httpMethod = "PUT"
        if let type { request.setValue(type, forHTTPHeaderField: "Content-Type") }
        if let length { request.setValue(String(length), forHTTPHeaderField: "Content-Length") }
        let (_, response) = try await URLSession.shared.upload(for: request, from: body)
        return (response as! HTTPURLResponse).statusCode
    }

    func testUploadAndDownload() async throws {
        let client = try await login(1)
        let info = try await client.iq("<iq type='get' id='info' to='upload.localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", id: "info")
        let query = try XCTUnwrap(info.child("query"))
        XCTAssertTrue(query.elements.contains { $0.name == "feature" && $0[attribute: "var"] == Self.namespace }, info.serialized())
        XCTAssertTrue(info.serialized().contains("<value>4000</value>"), "max-file-size in the form: \(info.serialized())")
        let items = try await client.iq("<iq type='get' id='items' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", id: "items")
        XCTAssertTrue(items.serialized().contains("jid='upload.localhost'"), items.serialized())

        let text = Data("hello, upload — ünïcode\n".utf8)
        let urls = try await slot(client, "notes ä.txt", size: text.count)
        let (putURL, getURL) = try XCTUnwrap(urls, lastError?.serialized() ?? "")
        XCTAssertTrue(getURL.absoluteString.hasPrefix("http://127.0.0.1:\(Self.httpPort)/upload/localhost/"), getURL.absoluteString)
        XCTAssertTrue(getURL.absoluteString.hasSuffix("/notes%20%C3%A4.txt"), getURL.absoluteString)

        // Nothing there before the upload.
        let (_, early) = try await URLSession.shared.data(from: getURL)
        XCTAssertEqual((early as? HTTPURLResponse)?.statusCode, 404)

        let status = try await put(putURL, text)
        XCTAssertEqual(status, 201)
        let (data, response) = try await URLSession.shared.data(from: getURL)
        let http = try XCTUnwrap(response as? HTTPURLResponse)
        XCTAssertEqual(http.statusCode, 200)
        XCTAssertEqual(data, text)
        XCTAssertEqual(http.value(forHTTPHeaderField: "Content-Type"), "text/plain")
        XCTAssertEqual(http.value(forHTTPHeaderField: "Access-Control-Allow-Origin"), "*")
        XCTAssertEqual(http.value(forHTTPHeaderField: "X-Content-Type-Options"), "nosniff")

        var head = URLRequest(url: getURL)
        head.httpMethod = "HEAD"
        let (_, headResponse) = try await URLSession.shared.data(for: head)
        XCTAssertEqual((headResponse as? HTTPURLResponse)?.value(forHTTPHeaderField: "Content-Length"), String(text.count))

        // A browser's preflight for the PUT.
        var preflight = URLRequest(url: putURL)
        preflight.httpMethod = "OPTIONS"
        preflight.setValue("PUT", forHTTPHeaderField: "Access-Control-Request-Method")
        let (_, preflightResponse) = try await URLSession.shared.data(for: preflight)
        XCTAssertEqual((preflightResponse as? HTTPURLResponse)?.statusCode, 204)
        XCTAssertTrue((preflightResponse as? HTTPURLResponse)?.value(forHTTPHeaderField: "Access-Control-Allow-Methods")?.contains("PUT") ?? false)

        // The URL works once: the file stays as it was.
        let again = try await put(putURL, Data(repeating: 65, count: text.count))
        XCTAssertEqual(again, 409)
        let (unchanged, _) = try await URLSession.shared.data(from: getURL)
        XCTAssertEqual(unchanged, text)
        await client.close()
    }

    func testPurgeCommandReportsPerHost() throws {
        // Nothing is a week old here: the command reaches the module and deletes nothing (expiry itself is
        // covered by UploadStoreTests with a clock of its own).
        let (status, output) = try Self.server.ctl(["purge-uploads"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("localhost: 0 expired file(s) deleted, 0 bytes"), output)
        XCTAssertTrue(output.contains("example.test: 0 expired file(s) deleted"), output)
    }

    func testTooLargeFilesAreRefusedWithTheLimit() async throws {
        let client = try await login(2)
        let urls = try await slot(client, "big.bin", size: 4001, type: "application/octet-stream")
        XCTAssertNil(urls)
        let error = try XCTUnwrap(lastError)
        XCTAssertEqual(error[attribute: "type"], "modify")
        XCTAssertNotNil(error.child("not-acceptable"), error.serialized())
        let tooLarge = try XCTUnwrap(error.child("file-too-large"), error.serialized())
        XCTAssertEqual(tooLarge.namespace, Self.namespace)
        XCTAssertEqual(tooLarge.child("max-file-size")?.text, "4000")
        await client.close()
    }

    func testTheQuotaCountsWhatAUserKeeps() async throws {
        let client = try await login(3)
        let first = try await slot(client, "a.txt", size: 4000)
        XCTAssertNotNil(first)
        let status = try await put(try XCTUnwrap(first).put, Data(repeating: 97, count: 4000))
        XCTAssertEqual(status, 201)
        // 4,000 of 6,000 bytes used: 2,000 more fit, 2,001 do not.
        let over = try await slot(client, "b.txt", size: 2001)
        XCTAssertNil(over)
        XCTAssertNotNil(lastError?.child("resource-constraint"), lastError?.serialized() ?? "")
        let fits = try await slot(client, "c.txt", size: 2000)
        XCTAssertNotNil(fits, lastError?.serialized() ?? "")
        await client.close()
    }

    func testForgedWrongSizedAndMistypedUploadsAreRefused() async throws {
        let client = try await login(1)
        let requested = try await slot(client, "photo.jpg", size: 100, type: "image/jpeg")
        let urls = try XCTUnwrap(requested)
        let body = Data(repeating: 7, count: 100)

        var forged = URLComponents(url: urls.put, resolvingAgainstBaseURL: false)!
        forged.queryItems = forged.queryItems?.map { $0.name == "e" ? URLQueryItem(name: "e", value: String(Int($0.value!)! + 3600)) : $0 }
        let forgedStatus = try await put(forged.url!, body, type: "image/jpeg")
        XCTAssertEqual(forgedStatus, 403, "a longer expiry breaks the signature")
        let unsigned = try await put(urls.get, body, type: "image/jpeg")
        XCTAssertEqual(unsigned, 403, "the GET URL is no PUT URL")
        let shorter = try await put(urls.put, Data(repeating: 7, count: 99), type: "image/jpeg")
        XCTAssertEqual(shorter, 400)
        let mistyped = try await put(urls.put, body, type: "text/html")
        XCTAssertEqual(mistyped, 400)
        let right = try await put(urls.put, body, type: "image/jpeg")
        XCTAssertEqual(right, 201)

        // Only users of the host get slots; bad names get none.
        let dotted = try await slot(client, "../escape", size: 10)
        XCTAssertNil(dotted)
        XCTAssertNotNil(lastError?.child("bad-request"), lastError?.serialized() ?? "")
        await client.close()
    }
}
