import StarlingSASL

/// Errors every storage backend reports the same way.
public enum StorageError: Error, Equatable, CustomStringConvertible, Sendable {
    case accountExists
    case accountNotFound
    /// The backend failed (I/O, lost connection, ...); the message is for logs, not clients.
    case backend(String)

    public var description: String {
        switch self {
        case .accountExists: return "the account already exists"
        case .accountNotFound: return "no such account"
        case .backend(let message): return "storage failure: \(message)"
        }
    }
}

/// Accounts and their SCRAM credentials. Passwords are never stored: only salted keys, one set per hash.
public protocol AccountStore: Sendable {
    func createAccount(username: String, host: String, credentials: [SCRAMCredentials]) async throws(StorageError)
    /// nil when the account does not exist.
    func credentials(username: String, host: String) async throws(StorageError) -> [SCRAMCredentials]?
    func setCredentials(username: String, host: String, credentials: [SCRAMCredentials]) async throws(StorageError)
    func deleteAccount(username: String, host: String) async throws(StorageError)
    func accounts(host: String) async throws(StorageError) -> [String]
    func accountExists(username: String, host: String) async throws(StorageError) -> Bool
}

extension AccountStore {
    /// Derives credentials for every SCRAM hash we offer and creates the account. PBKDF2 runs here, so
    /// callers on an event loop must hop off it first.
    public func register(username: String, host: String, password: String, iterations: Int) async throws(StorageError) {
        try await createAccount(username: username, host: host, credentials: SCRAMHash.allCases.map {
            SCRAMCredentials.generate(password: password, hash: $0, iterations: iterations)
        })
    }

    public func changePassword(username: String, host: String, password: String, iterations: Int) async throws(StorageError) {
        try await setCredentials(username: username, host: host, credentials: SCRAMHash.allCases.map {
            SCRAMCredentials.generate(password: password, hash: $0, iterations: iterations)
        })
    }
}
