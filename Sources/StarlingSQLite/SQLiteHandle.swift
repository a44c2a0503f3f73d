import NIOCore
import SQLiteNIO
// The SQLite library that sqlite-nio builds, so the process has exactly one SQLite: two copies working on
// one database file would not see each other's POSIX locks (sqlite.org/howtocorrupt.html, 2.2.1).
private import VaporCSQLite
private import CSQLiteOptions

/// One SQLite connection and its prepared statements, used by one thread at a time (the store's own
/// thread; see `SQLiteStore.run`).
///
/// sqlite-nio's `SQLiteConnection` prepares every statement anew and hops threads for every statement and
/// every row it returns; a login runs a handful of store operations, so those hops and the parsing were
/// most of its cost. Here an operation runs all its statements in one go, each prepared once and kept.
final class SQLiteHandle {
    /// Prepared statements by SQL text. Statements whose text is built from the input (an `IN` list's
    /// length, say) are kept too, up to this many; past it a statement is prepared for its one use.
    static let statementCacheLimit = 256

    private var database: OpaquePointer?
    private var statements: [String: OpaquePointer] = [:]

    private static let libraryInitialized: Bool = {
        // sqlite3_initialize is not safe to race with a first sqlite3_open_v2 on another thread.
        sqlite_nio_sqlite3_initialize() == SQLITE_OK
    }()

    /// Set by `close`: the store is shutting down.
    private(set) var isClosed = false

    /// Opens (creating it if needed) the database file at `path`.
    func open(path: String, busyTimeoutMilliseconds: Int32) throws(SQLiteFailure) {
        guard Self.libraryInitialized else { throw SQLiteFailure(code: SQLITE_ERROR, message: "SQLite failed to initialize") }
        var database: OpaquePointer?
        let flags = SQLITE_OPEN_CREATE | SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE
        let status = sqlite_nio_sqlite3_open_v2(path, &database, flags, nil)
        guard status == SQLITE_OK, let database else {
            let message = database.flatMap { sqlite_nio_sqlite3_errmsg($0) }.map { String(cString: $0) } ?? "code \(status)"
            sqlite_nio_sqlite3_close(database)
            throw SQLiteFailure(code: status, message: message)
        }
        self.database = database
        sqlite_nio_sqlite3_busy_timeout(database, busyTimeoutMilliseconds)
        // Without it, SQLite prepares a kept statement again whenever a bound value might change its plan
        // (an ORDER BY on a key, a join on one: most login reads), which undoes preparing it once.
        let planStability = starling_sqlite_enable_qpsg(UnsafeMutableRawPointer(database))
        guard planStability == SQLITE_OK else { throw SQLiteFailure(database, code: planStability, sql: "sqlite3_db_config(SQLITE_DBCONFIG_ENABLE_QPSG)") }
    }

    deinit { close() }

    /// Finalizes every statement and closes the connection; queries afterwards fail.
    func close() {
        isClosed = true
        for statement in statements.values { sqlite_nio_sqlite3_finalize(statement) }
        statements = [:]
        sqlite_nio_sqlite3_close(database)
        database = nil
    }

    /// Runs one statement with `binds` for its `?` parameters and returns every row it yields.
    @discardableResult
    func query(_ sql: String, _ binds: [SQLiteData] = []) throws(SQLiteFailure) -> [SQLiteResultRow] {
        guard let database else { throw SQLiteFailure(code: SQLITE_MISUSE, message: isClosed ? "the database is closed" : "the database is not open") }
        let (statement, cached) = try prepared(sql, in: database)
        defer {
            if cached {
                sqlite_nio_sqlite3_reset(statement)
                sqlite_nio_sqlite3_clear_bindings(statement)
            } else {
                sqlite_nio_sqlite3_finalize(statement)
            }
        }
        guard binds.count == Int(sqlite_nio_sqlite3_bind_parameter_count(statement)) else {
            throw SQLiteFailure(code: SQLITE_RANGE, message: "\(binds.count) values for the parameters of: \(sql)")
        }
        for (index, value) in binds.enumerated() {
            try check(bind(value, at: Int32(index + 1), of: statement), in: database, sql: sql)
        }
        var rows: [SQLiteResultRow] = []
        var names: SQLiteColumnNames?
        while true {
            let status = sqlite_nio_sqlite3_step(statement)
            if status == SQLITE_DONE { return rows }
            guard status == SQLITE_ROW else { throw SQLiteFailure(database, code: status, sql: sql) }
            let columns = names ?? SQLiteColumnNames(statement)
            names = columns
            rows.append(SQLiteResultRow(names: columns, values: (0..<Int32(columns.names.count)).map { Self.value(at: $0, of: statement) }))
        }
    }

    /// Runs `body` inside a transaction that takes the write lock at once, rolling back if it throws.
    @discardableResult
    func transaction<T>(_ body: () throws -> T) throws -> T {
        try query("BEGIN IMMEDIATE")
        do {
            let result = try body()
            try query("COMMIT")
            return result
        } catch {
            _ = try? query("ROLLBACK")
            throw error
        }
    }

    private func prepared(_ sql: String, in database: OpaquePointer) throws(SQLiteFailure) -> (OpaquePointer, cached: Bool) {
        if let statement = statements[sql] { return (statement, true) }
        let keep = statements.count < Self.statementCacheLimit
        var statement: OpaquePointer?
        var tail: UnsafePointer<CChar>?
        let status = sql.withCString { text in
            let status = sqlite_nio_sqlite3_prepare_v3(database, text, -1, keep ? UInt32(SQLITE_PREPARE_PERSISTENT) : 0, &statement, &tail)
            // More than one statement in the text would run only the first: refuse it rather than skip the rest.
            if status == SQLITE_OK, let tail, tail.pointee != 0, String(cString: tail).contains(where: { !$0.isWhitespace }) {
                return SQLITE_MISUSE
            }
            return status
        }
        guard status == SQLITE_OK, let statement else {
            let failure = if status == SQLITE_MISUSE && statement != nil {
                SQLiteFailure(code: status, message: "more than one statement in: \(sql)")
            } else if status == SQLITE_OK {
                SQLiteFailure(code: SQLITE_MISUSE, message: "no statement in: \(sql)")
            } else {
                SQLiteFailure(database, code: status, sql: sql)
            }
            sqlite_nio_sqlite3_finalize(statement)
            throw failure
        }
        if keep { statements[sql] = statement }
        return (statement, keep)
    }

    private func bind(_ value: SQLiteData, at index: Int32, of statement: OpaquePointer) -> Int32 {
        switch value {
        case .integer(let number):
            return sqlite_nio_sqlite3_bind_int64(statement, index, Int64(number))
        case .float(let number):
            return sqlite_nio_sqlite3_bind_double(statement, index, number)
        case .text(let text):
            // A null pointer would bind NULL, not the empty string.
            guard !text.isEmpty else { return sqlite_nio_sqlite3_bind_text64(statement, index, "", 0, transient, UInt8(SQLITE_UTF8)) }
            var text = text
            return text.withUTF8 { bytes in
                bytes.withMemoryRebound(to: CChar.self) { characters in
                    sqlite_nio_sqlite3_bind_text64(statement, index, characters.baseAddress, UInt64(characters.count), transient, UInt8(SQLITE_UTF8))
                }
            }
        case .blob(let buffer):
            return buffer.withUnsafeReadableBytes { bytes in
                guard let base = bytes.baseAddress else { return sqlite_nio_sqlite3_bind_zeroblob(statement, index, 0) }
                return sqlite_nio_sqlite3_bind_blob64(statement, index, base, UInt64(bytes.count), transient)
            }
        case .null:
            return sqlite_nio_sqlite3_bind_null(statement, index)
        }
    }

    private func check(_ status: Int32, in database: OpaquePointer, sql: String) throws(SQLiteFailure) {
        guard status == SQLITE_OK else { throw SQLiteFailure(database, code: status, sql: sql) }
    }

    private static func value(at column: Int32, of statement: OpaquePointer) -> SQLiteData {
        switch sqlite_nio_sqlite3_column_type(statement, column) {
        case SQLITE_INTEGER:
            return .integer(Int(sqlite_nio_sqlite3_column_int64(statement, column)))
        case SQLITE_FLOAT:
            return .float(sqlite_nio_sqlite3_column_double(statement, column))
        case SQLITE_TEXT:
            // The text first, then its length: that order gives the length of the UTF-8 form.
            guard let text = sqlite_nio_sqlite3_column_text(statement, column) else { return .text("") }
            let count = Int(sqlite_nio_sqlite3_column_bytes(statement, column))
            return .text(String(decoding: UnsafeBufferPointer(start: text, count: count), as: UTF8.self))
        case SQLITE_BLOB:
            let bytes = sqlite_nio_sqlite3_column_blob(statement, column)
            let count = Int(sqlite_nio_sqlite3_column_bytes(statement, column))
            return .blob(ByteBuffer(bytes: UnsafeRawBufferPointer(start: bytes, count: bytes == nil ? 0 : count)))
        default:
            return .null
        }
    }
}

/// SQLite copies a bound value before the call returns (`SQLITE_TRANSIENT`, a macro Swift cannot import).
private let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

/// A statement's column names, shared by all the rows it returns.
final class SQLiteColumnNames: Sendable {
    let names: [String]

    fileprivate init(_ statement: OpaquePointer) {
        names = (0..<sqlite_nio_sqlite3_column_count(statement)).map { column in
            sqlite_nio_sqlite3_column_name(statement, column).map { String(cString: $0) } ?? ""
        }
    }
}

/// One row a query returned.
struct SQLiteResultRow: Sendable {
    let names: SQLiteColumnNames
    let values: [SQLiteData]

    /// The value of the column named `name` (as the query names it: `AS n`, or the column's own name).
    func column(_ name: String) -> SQLiteData? {
        names.names.firstIndex(of: name).map { values[$0] }
    }
}

/// An SQLite error: its (extended) result code and message, and the statement it came from.
struct SQLiteFailure: Error, CustomStringConvertible {
    let code: Int32
    let message: String

    init(code: Int32, message: String) {
        self.code = code
        self.message = message
    }

    fileprivate init(_ database: OpaquePointer, code: Int32, sql: String) {
        self.code = code
        let detail = sqlite_nio_sqlite3_errmsg(database).map { String(cString: $0) } ?? "error"
        self.message = "\(detail) (in: \(sql.split(whereSeparator: \.isWhitespace).joined(separator: " ")))"
    }

    var description: String { "SQLite error \(code): \(message)" }
}
