#ifndef STARLING_LUA_SANDBOX_H
#define STARLING_LUA_SANDBOX_H
// The Lua sandbox behind `StarlingLua`, in C: a Lua error is a longjmp and must never cross a Swift
// frame, so every Lua call that can fail runs here under lua_pcall, and Swift only fills and reads the
// plain structs below. Lua's own headers stay inside this target.
#include <stddef.h>

/// One sandboxed Lua state and its limits. Opaque to Swift.
typedef struct starling_lua_sandbox starling_lua_sandbox;

typedef struct starling_lua_string {
    const char *data;
    size_t length;
} starling_lua_string;

/// What one state may use. Every hook call starts with `instructions` units of budget: VM instructions,
/// pattern-matching steps, bytes allocated (one unit per 32) and the work of library functions whose cost
/// grows with their arguments all draw from it. `time_limit` (seconds of the thread's CPU time) stops a
/// call that the budget somehow did not; `watchdog` (seconds of wall-clock time) only records where a
/// slow call was, for the log.
typedef struct starling_lua_limits {
    long long instructions;
    size_t memory;
    double time_limit;
    double watchdog;
} starling_lua_limits;

/// A value a Swift function hands back to a script.
typedef struct starling_lua_value {
    int kind; /* 0 nil, 1 number, 2 string, 3 boolean, -1 error (message in data) */
    double number;
    const char *data;
    size_t length;
} starling_lua_value;

/// A function Swift provides to scripts (`starling.log`, `starling.incr`, ...). It reads up to 4 string
/// arguments and sets `result`; it returns 0, or -1 with an error message in `result` (raised as a Lua
/// error in C).
typedef int (*starling_lua_swift_function)(void *context, int function, const starling_lua_string *arguments, int count,
                                           starling_lua_value *result);

typedef struct starling_lua_open {
    starling_lua_swift_function function;
    void *context;
    const char *const *function_names; /* installed as starling.<name>, selector = index */
    int function_count;
    /// Runs first; it must return two functions: the dispatcher (event, priority, stanza) and the handler
    /// list. They are kept where scripts cannot reach them.
    starling_lua_string prelude;
    starling_lua_string script;
    const char *chunk_name;
} starling_lua_open;

/// Why a call was stopped.
typedef enum starling_lua_stop {
    STARLING_LUA_RAN = 0,
    STARLING_LUA_STOPPED_BUDGET = 1,
    STARLING_LUA_STOPPED_TIME = 2,
    STARLING_LUA_STOPPED_MEMORY = 3,
    STARLING_LUA_FAILED = 4
} starling_lua_stop;

/// A typed value in a table handed to a script (and read back after "modify").
typedef struct starling_lua_field {
    starling_lua_string key;
    int kind; /* 0 string (text), 1 number, 2 boolean (number != 0); in results also -1: nil or another type */
    starling_lua_string text;
    double number;
} starling_lua_field;

/// Named fields of the event table: `name` is a sub-table (`event.room`), or empty for fields of the
/// event table itself.
typedef struct starling_lua_table {
    starling_lua_string name;
    int field_count;
    const starling_lua_field *fields;
} starling_lua_table;

/// The parts of a stanza a script can read.
typedef enum starling_lua_stanza_part {
    STARLING_LUA_STANZA_NAME = 0,
    STARLING_LUA_STANZA_BODY = 1,
    STARLING_LUA_STANZA_ATTRIBUTE_COUNT = 2,
    STARLING_LUA_STANZA_ATTRIBUTE_NAME = 3,
    STARLING_LUA_STANZA_ATTRIBUTE_VALUE = 4,
    /// The value of the attribute whose qualified name is `key`.
    STARLING_LUA_STANZA_ATTRIBUTE_NAMED = 5
} starling_lua_stanza_part;

/// Reads one part of the stanza a call is about, when a script asks for it: copies its UTF-8 into
/// `buffer` if it fits in `capacity` bytes and returns its whole length (call again with a larger buffer
/// when it did not fit), or -1 when the stanza has no such part. `index` picks an attribute by position,
/// `key` by name. For STARLING_LUA_STANZA_ATTRIBUTE_COUNT it returns the count and copies nothing. It never
/// touches the Lua state.
typedef long (*starling_lua_stanza_reader)(const void *stanza, starling_lua_stanza_part part, int index, starling_lua_string key,
                                           char *buffer, size_t capacity);

/// One hook call: the event, the stanza (read through `read_stanza` only while the call runs, plus typed
/// tables for events such as MUC ones), and the priority whose handlers run. The results are malloc'd;
/// free them with starling_lua_call_free.
typedef struct starling_lua_call {
    starling_lua_string event;
    long long priority;
    starling_lua_stanza_reader read_stanza;
    const void *stanza;
    int table_count;
    const starling_lua_table *tables;

    int verdict; /* 0 pass, 1 drop, 2 error, 3 modify, 4 allow (authenticate), 5 kick (MUC; reason in text) */
    char *condition;
    char *text;
    int result_attribute_count;
    char **result_attributes; /* name, value, ... */
    char *result_body;
    int result_has_body;
    /// After "modify": every field of `tables`, in order, as the script left it (text malloc'd).
    int result_field_count;
    starling_lua_field *result_fields;
    char *error;
    starling_lua_stop stop;
    /// Wall-clock seconds the call took.
    double elapsed;
    /// "file:line" where the call was first seen running past the watchdog, or NULL.
    char *slow_location;
} starling_lua_call;

/// Opens a sandboxed state and runs the prelude and the script's top level (which registers its
/// handlers) under the limits. On failure returns NULL and a malloc'd message in *error.
starling_lua_sandbox *starling_lua_sandbox_open(const starling_lua_limits *limits, const starling_lua_open *open, char **error);

/// Closes the state; finalizers a script set up cannot run a single instruction here.
void starling_lua_sandbox_close(starling_lua_sandbox *sandbox);

/// Bytes the state holds now, and its cap.
size_t starling_lua_sandbox_memory(const starling_lua_sandbox *sandbox);
size_t starling_lua_sandbox_memory_cap(const starling_lua_sandbox *sandbox);

/// Runs the handlers of `call->event` at `call->priority` under the limits. Returns 0, or nonzero with
/// call->error holding the message (which names file and line where Lua knows them).
int starling_lua_sandbox_invoke(starling_lua_sandbox *sandbox, starling_lua_call *call);

/// The handlers the script registered, as "event priority" lines (malloc'd), or NULL.
char *starling_lua_sandbox_handlers(starling_lua_sandbox *sandbox);

void starling_lua_call_free(starling_lua_call *call);

/// Evaluates `source` (a chunk returning one string) in a state with Lua's standard string library as
/// `string` and the sandbox's bounded pattern functions as `bounded` (find, match, gmatch, gsub), under
/// the limits. For tests that compare the two. Returns a malloc'd result or error text; *failed says which.
char *starling_lua_pattern_compare(const starling_lua_limits *limits, starling_lua_string source, int *failed);

/// Reads a Lua data file, as Prosody's internal storage writes them (`return { ... };`, or `item({ ... });`
/// once per entry of a list), in a state with no libraries and at most `instruction_limit` VM instructions.
/// Returns a malloc'd JSON text of the value (the returned one, or the list of items), in which a table is
/// `{"t": [[key, value], ...]}` (keys of any type), a string is a JSON string whose characters U+0000..U+00FF
/// are its bytes, and nil is null; or NULL with *error set to a malloc'd message naming the line.
char *starling_lua_read_data(starling_lua_string source, const char *chunk_name, long long instruction_limit, char **error);

#endif
