#include "csqliteoptions.h"

// sqlite3_db_config is variadic, which Swift cannot call. This target cannot include sqlite-nio's header
// (its C target is not a product), so the one function used is declared here; sqlite-nio's SQLite
// prefixes its symbols with sqlite_nio_ and is linked into every product that links SQLiteNIO.
struct sqlite3;
extern int sqlite_nio_sqlite3_db_config(struct sqlite3 *, int op, ...);

enum { starling_sqlite_dbconfig_enable_qpsg = 1007 }; // SQLITE_DBCONFIG_ENABLE_QPSG

int starling_sqlite_enable_qpsg(void *database) {
    return sqlite_nio_sqlite3_db_config((struct sqlite3 *)database, starling_sqlite_dbconfig_enable_qpsg, 1, (int *)0);
}
