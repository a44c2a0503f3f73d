import Foundation
import Hummingbird
import Logging
import StarlingAPI
import StarlingTestClient
import XCTest

/// A real browser: Debian's headless Chromium loads a page this test serves, logs in over WebSocket with
/// the browser's own `WebSocket` (TLS at the server's HTTP listener), uploads a file with `fetch` (XEP-0363)
/// and messages a TCP client.
final class BrowserTests: XCTestCase {
    static let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].first { FileManager.default.isExecutableFile(atPath: $0) }

    /// The page the test serves and the outcome it posts back.
    final class PageServer: @unchecked Sendable {
        let results: AsyncStream<String>
        private let task: Task<Void, any Error>
        let port: Int

        init(page: String) async throws {
            let (results, report) = AsyncStream<String>.makeStream()
            let (ports, announce) = AsyncStream<Int>.makeStream()
            let router = Router()
            router.get("/page") { _, _ in
                Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(string: page)))
            }
            router.post("/result") { request, _ -> HTTPResponse.Status in
                let body = try await request.body.collect(upTo: 1 << 20)
                report.yield(String(buffer: body))
                return .ok
            }
            var quiet = Logger(label: "page-server")
            quiet.logLevel = .critical
            let application = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
                                          onServerRunning: { announce.yield($0.localAddress?.port ?? 0) }, logger: quiet)
            task = Task { try await application.run() }
            var iterator = ports.makeAsyncIterator()
            port = await iterator.next() ?? 0
            self.results = results
        }

        func stop() {
            task.cancel()
        }
    }

    func testChromiumLogsInUploadsAndMessagesATCPClient() async throws {
        guard let chromium = Self.chromium else { throw XCTSkip("Chromium is not installed (scripts/bootstrap installs Debian's chromium)") }
        let httpsPort = try ServerProcess.freePort()
        let server = try ServerProcess(extraConfig: """
        modules:
          disco: {}
          roster: {}
          presence: {}
          http_upload: { base_url: "https://127.0.0.1:\(httpsPort)" }
        """, users: [("browser", "pw-browser"), ("desk", "pw-desk")],
        extraListeners: ["{ type: http, address: 127.0.0.1, port: \(httpsPort), tls: direct }"])
        defer { XCTAssertEqual(server.stop(), 0) }
        let desk = try await TestClient.login(port: server.directTLSPort, domain: "localhost", tls: .direct, username: "desk", password: "pw-desk", resource: "desk")

        let pagePath = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Browser/websocket-client.html")
        let pages = try await PageServer(page: try String(contentsOf: pagePath, encoding: .utf8))
        defer { pages.stop() }
        var query = URLComponents(string: "http://127.0.0.1:\(pages.port)/page")!
        query.queryItems = [
            .init(name: "ws", value: "wss://127.0.0.1:\(server.httpsPort)/xmpp-websocket"),
            .init(name: "domain", value: "localhost"), .init(name: "user", value: "browser"), .init(name: "password", value: "pw-browser"),
            .init(name: "peer", value: "desk@localhost/desk"), .init(name: "upload", value: "upload.localhost"),
        ]
        let profile = server.directory.appendingPathComponent("chromium-profile").path
        // The server's certificate is the self-signed development one, hence --ignore-certificate-errors.
        let browser = try ServerProcess.startDaemon(chromium, [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--ignore-certificate-errors", "--user-data-dir=\(profile)", query.url!.absoluteString,
        ])
        defer { browser.terminate(); browser.waitUntilExit() }

        let hello = try await desk.expect("the browser's message", timeout: 60) { $0.name == "message" }
        XCTAssertEqual(hello[attribute: "from"], "browser@localhost/chromium")
        XCTAssertEqual(hello.child("body")?.text, "hello from Chromium")
        desk.send("<message to='browser@localhost/chromium' type='chat'><body>hello, browser</body></message>")

        var outcomes = pages.results.makeAsyncIterator()
        let reported = await outcomes.next()
        let outcome = try XCTUnwrap(reported)
        let result = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(outcome.utf8)) as? [String: Any])
        XCTAssertEqual(result["ok"] as? Bool, true, outcome)
        XCTAssertEqual(result["jid"] as? String, "browser@localhost/chromium", outcome)
        XCTAssertEqual(result["reply"] as? String, "hello, browser", outcome)
        XCTAssertEqual(result["replyFrom"] as? String, "desk@localhost/desk", outcome)
        XCTAssertEqual(result["mechanisms"] as? [String], ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"], outcome)
        // The page's fetch PUT went through CORS to the server's HTTPS listener, and its GET read the file back.
        let upload = try XCTUnwrap(result["upload"] as? [String: Any], outcome)
        XCTAssertEqual(upload["putStatus"] as? Int, 201, outcome)
        XCTAssertEqual(upload["getStatus"] as? Int, 200, outcome)
        XCTAssertEqual(upload["matches"] as? Bool, true, outcome)
        XCTAssertTrue((upload["url"] as? String ?? "").hasPrefix("https://127.0.0.1:\(httpsPort)/upload/localhost/"), outcome)
        await desk.close()
    }
}
