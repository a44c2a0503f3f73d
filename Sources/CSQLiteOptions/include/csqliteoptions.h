#ifndef STARLING_CSQLITEOPTIONS_H
#define STARLING_CSQLITEOPTIONS_H

/// Turns on SQLite's query planner stability guarantee (SQLITE_DBCONFIG_ENABLE_QPSG) for the connection
/// `database` (an `sqlite3 *` of sqlite-nio's SQLite): plans no longer depend on bound values, so a
/// prepared statement is not prepared again each time it is bound to new values. Returns SQLite's
/// result code.
int starling_sqlite_enable_qpsg(void *database);

#endif
