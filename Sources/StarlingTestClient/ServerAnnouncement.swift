/// The machine-readable lines `starling` prints on standard output once it serves
/// (`starling: listening c2s-starttls ADDRESS PORT`, ..., `starling: ready`), read by the tests and the
/// load generator to find the ports of a server started with port 0.
public struct ServerAnnouncement: Sendable, Equatable {
    public var starttlsPort = 0
    public var directTLSPort = 0
    /// HTTP listeners (`http-none` plaintext, `http-direct` HTTPS), 0 when there are none.
    public var httpPort = 0
    public var httpsPort = 0
    /// The admin API's listener (`admin-none` or `admin-direct`), 0 when there is none.
    public var adminPort = 0
    /// The first s2s listener, 0 when there is none.
    public var s2sPort = 0

    /// nil until the `starling: ready` line is in `output`.
    public init?(output: String) {
        guard output.contains("starling: ready\n") || output.hasSuffix("starling: ready") else { return nil }
        for line in output.split(separator: "\n") where line.hasPrefix("starling: listening") {
            let fields = line.split(separator: " ")
            guard fields.count >= 5, let port = Int(fields[4]) else { continue }
            switch fields[2] {
            case "c2s-starttls": starttlsPort = port
            case "c2s-direct": directTLSPort = port
            case "http-none": httpPort = port
            case "http-direct": httpsPort = port
            case "admin-none", "admin-direct": adminPort = port
            case "s2s-starttls", "s2s-direct": if s2sPort == 0 { s2sPort = port }
            default: break
            }
        }
    }
}
