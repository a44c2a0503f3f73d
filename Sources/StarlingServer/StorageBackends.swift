import Logging
import StarlingConfig
import StarlingPostgres
import StarlingSQLite
import StarlingStorage

/// Opens the configured backend (and migrates it).
public enum StorageBackends {
    public static func open(_ configuration: StarlingConfiguration, logger: Logger) async throws(StorageError) -> any StarlingStore {
        switch configuration.storage.backend {
        case .sqlite:
            return try await SQLiteStore.open(path: configuration.storage.path, logger: logger)
        case .postgresql:
            let storage = configuration.storage
            return try await PostgresStore.open(.init(url: storage.url ?? "", poolSize: storage.poolSize, timeout: storage.timeout), logger: logger)
        }
    }
}
