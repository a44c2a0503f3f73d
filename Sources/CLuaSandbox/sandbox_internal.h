#ifndef STARLING_LUA_SANDBOX_INTERNAL_H
#define STARLING_LUA_SANDBOX_INTERNAL_H
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include "CLuaSandbox.h"

/// How often (in VM instructions) the count hook charges the budget and reads the clocks.
#define STARLING_LUA_HOOK_PERIOD 1000

struct starling_lua_sandbox {
    lua_State *L;
    size_t used;
    size_t cap;
    long long budget;
    /// Units left in the running call; at or below zero the call is stopped at its next instruction.
    long long remaining;
    /// The count the hook is armed with: what each firing charges.
    int hook_period;
    int in_call;
    starling_lua_stop stopped;
    uint64_t cpu_started_ns;
    uint64_t cpu_limit_ns;
    uint64_t wall_started_ns;
    uint64_t watchdog_ns;
    int slow_noted;
    char slow_location[200];
    /// Registry references to the prelude's dispatcher and handler list.
    int dispatch_ref;
    int handler_list_ref;
    /// Registry references to the metatables of stanza tables (filled on first read) and of their
    /// `attr` tables (each read looks the attribute up; the first change or listing copies them all).
    int stanza_metatable_ref;
    int attributes_metatable_ref;
    /// The call running now, its stanza table and attr table (as lua_topointer gives them), which of the
    /// stanza table's fields were filled or assigned already (bits), and whether the attr table holds
    /// every attribute. Tables kept past their call are plain tables of what had been filled.
    const starling_lua_call *current_call;
    const void *current_stanza_table;
    const void *current_attributes_table;
    unsigned stanza_fields_touched;
    int attributes_complete;
    /// Where the stanza reader copies a part before it is pushed.
    char *scratch;
    size_t scratch_capacity;
};

/// The sandbox a state belongs to (the allocator's user data).
starling_lua_sandbox *starling_lua_sandbox_of(lua_State *L);

/// Takes `units` from the running call's budget. When it runs out, raises `what` (e.g. "pattern too
/// expensive in string.find") at the Lua caller's file:line, and the call stays stopped: a script that catches the error with pcall is
/// stopped again at its next instruction.
void starling_lua_charge(lua_State *L, long long units, const char *what);

/// Checks the clocks from inside a long-running C function: past the time limit it raises at the Lua
/// caller's file:line; past the watchdog it notes where the call was.
void starling_lua_check_clock(lua_State *L, const char *what);

/// Installs the bounded pattern functions (find, match, gmatch, gsub) into the table at `index`.
void starling_lua_install_patterns(lua_State *L, int index);

/// Replaces library functions whose cost grows with their arguments with ones that charge for it first.
void starling_lua_install_costs(lua_State *L);

#endif
