// The sandboxed state: the allocator with its cap, the budget every call draws from, the clocks, and the
// protected calls Swift goes through.
#include "sandbox_internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t clock_ns(clockid_t clock) {
    struct timespec now;
    clock_gettime(clock, &now);
    return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}

static char *copy_text(const char *data, size_t length) {
    char *copy = (char *)malloc(length + 1);
    if (copy == NULL) return NULL;
    memcpy(copy, data, length);
    copy[length] = 0;
    return copy;
}

starling_lua_sandbox *starling_lua_sandbox_of(lua_State *L) {
    void *user = NULL;
    lua_getallocf(L, &user);
    return (starling_lua_sandbox *)user;
}

static void budget_hook(lua_State *L, lua_Debug *ar);

/// Stops the running call: its next instruction raises, and so does every one after it, so a script
/// cannot catch the stop with pcall and carry on.
static void stop_call(starling_lua_sandbox *sandbox, starling_lua_stop reason) {
    if (sandbox->stopped == STARLING_LUA_RAN) sandbox->stopped = reason;
    sandbox->remaining = 0;
    sandbox->hook_period = 1;
    // lua_sethook may be called at any point (it is how Lua's own interpreter stops a script on a signal).
    lua_sethook(sandbox->L, budget_hook, LUA_MASKCOUNT, 1);
}

/// Lua allocates through here. Growth is refused past the cap (Lua raises "not enough memory" and the
/// state stays usable) and, during a call, costs one unit of budget per 32 bytes asked for: copying and
/// building strings costs time the instruction count does not see.
static void *sandbox_alloc(void *user, void *block, size_t old_size, size_t new_size) {
    starling_lua_sandbox *sandbox = (starling_lua_sandbox *)user;
    size_t old = block ? old_size : 0;
    if (new_size == 0) {
        free(block);
        sandbox->used -= old;
        return NULL;
    }
    if (new_size > old) {
        size_t growth = new_size - old;
        if (sandbox->in_call) {
            sandbox->remaining -= (long long)(growth >> 5);
            if (sandbox->remaining <= 0 && sandbox->stopped == STARLING_LUA_RAN) stop_call(sandbox, STARLING_LUA_STOPPED_BUDGET);
        }
        if (sandbox->used + growth > sandbox->cap) return NULL;
    }
    void *grown = realloc(block, new_size);
    if (grown != NULL) sandbox->used = sandbox->used - old + new_size;
    return grown;
}

static void note_slow(starling_lua_sandbox *sandbox, lua_State *L, lua_Debug *ar) {
    if (sandbox->slow_noted) return;
    sandbox->slow_noted = 1;
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0) {
        snprintf(sandbox->slow_location, sizeof sandbox->slow_location, "%s:%d", ar->short_src, ar->currentline);
    }
}

static void note_slow_caller(starling_lua_sandbox *sandbox, lua_State *L) {
    lua_Debug ar;
    if (!sandbox->slow_noted && lua_getstack(L, 1, &ar)) note_slow(sandbox, L, &ar);
}

static const char *stop_message(starling_lua_sandbox *sandbox, char *buffer, size_t size) {
    switch (sandbox->stopped) {
    case STARLING_LUA_STOPPED_TIME:
        snprintf(buffer, size, "time limit of %.0f ms exceeded", (double)sandbox->cpu_limit_ns / 1e6);
        return buffer;
    default:
        return "instruction budget exceeded";
    }
}

/// Whether the call has used up its CPU time. The thread's CPU clock is a system call, so most calls,
/// which end before the first check, never read it: the count starts at the first check, one hook
/// period (or a few thousand matcher steps) into the call.
static int cpu_time_exceeded(starling_lua_sandbox *sandbox) {
    uint64_t now = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    if (sandbox->cpu_started_ns == 0) {
        sandbox->cpu_started_ns = now;
        return 0;
    }
    return now - sandbox->cpu_started_ns > sandbox->cpu_limit_ns;
}

/// Fires every `hook_period` instructions: charges them, reads the clocks, and raises once the call is
/// stopped, naming the script's file and line.
static void budget_hook(lua_State *L, lua_Debug *ar) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    if (sandbox->stopped == STARLING_LUA_RAN) {
        sandbox->remaining -= sandbox->hook_period;
        if (sandbox->remaining <= 0) {
            stop_call(sandbox, STARLING_LUA_STOPPED_BUDGET);
        } else if (cpu_time_exceeded(sandbox)) {
            stop_call(sandbox, STARLING_LUA_STOPPED_TIME);
        } else if (!sandbox->slow_noted && clock_ns(CLOCK_MONOTONIC) - sandbox->wall_started_ns > sandbox->watchdog_ns) {
            note_slow(sandbox, L, ar);
        }
    }
    if (sandbox->stopped == STARLING_LUA_RAN) return;
    char buffer[64];
    const char *message = stop_message(sandbox, buffer, sizeof buffer);
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0) {
        lua_pushfstring(L, "%s:%d: %s", ar->short_src, ar->currentline, message);
    } else {
        lua_pushstring(L, message);
    }
    lua_error(L);
}

void starling_lua_charge(lua_State *L, long long units, const char *what) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    sandbox->remaining -= units;
    if (sandbox->remaining > 0 && sandbox->stopped == STARLING_LUA_RAN) return;
    stop_call(sandbox, STARLING_LUA_STOPPED_BUDGET);
    luaL_error(L, "%s (the instruction budget of %I is used up)", what, (lua_Integer)sandbox->budget);
}

void starling_lua_check_clock(lua_State *L, const char *what) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    if (cpu_time_exceeded(sandbox)) {
        stop_call(sandbox, STARLING_LUA_STOPPED_TIME);
        luaL_error(L, "%s: time limit of %d ms exceeded", what, (int)(sandbox->cpu_limit_ns / 1000000));
    }
    if (!sandbox->slow_noted && clock_ns(CLOCK_MONOTONIC) - sandbox->wall_started_ns > sandbox->watchdog_ns) note_slow_caller(sandbox, L);
}

/// Calls `function(argument)` under lua_pcall with a fresh budget. On failure returns the Lua status and
/// a malloc'd message in *error (the caller frees it).
static int protected_call(starling_lua_sandbox *sandbox, lua_CFunction function, void *argument, char **error) {
    lua_State *L = sandbox->L;
    lua_settop(L, 0);
    lua_pushcfunction(L, function);
    lua_pushlightuserdata(L, argument);
    sandbox->remaining = sandbox->budget;
    sandbox->stopped = STARLING_LUA_RAN;
    sandbox->slow_noted = 0;
    sandbox->slow_location[0] = 0;
    sandbox->hook_period = sandbox->budget < STARLING_LUA_HOOK_PERIOD ? (int)sandbox->budget : STARLING_LUA_HOOK_PERIOD;
    sandbox->cpu_started_ns = 0;
    sandbox->wall_started_ns = clock_ns(CLOCK_MONOTONIC);
    sandbox->in_call = 1;
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, sandbox->hook_period);
    int status = lua_pcall(L, 1, 0, 0);
    lua_sethook(L, NULL, 0, 0);
    sandbox->in_call = 0;
    if (status != LUA_OK) {
        // Running out of memory ends the call even when the budget ran out on the same allocation.
        if (status == LUA_ERRMEM) sandbox->stopped = STARLING_LUA_STOPPED_MEMORY;
        if (sandbox->stopped == STARLING_LUA_RAN) sandbox->stopped = STARLING_LUA_FAILED;
        size_t length = 0;
        const char *message = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &length) : NULL;
        if (message == NULL) {
            message = status == LUA_ERRMEM ? "not enough memory" : "error without a message";
            length = strlen(message);
        }
        if (error) *error = copy_text(message, length);
    }
    lua_settop(L, 0);
    return status;
}

/// Calls Swift from a script (`starling.<name>`): up to four arguments as strings, one result.
static int swift_dispatch(lua_State *L) {
    starling_lua_swift_function function = (starling_lua_swift_function)lua_touserdata(L, lua_upvalueindex(1));
    void *context = lua_touserdata(L, lua_upvalueindex(2));
    int selector = (int)lua_tointeger(L, lua_upvalueindex(3));
    starling_lua_string arguments[4];
    int count = lua_gettop(L);
    if (count > 4) count = 4;
    long long bytes = 0;
    for (int index = 0; index < count; index++) {
        if (lua_isnil(L, index + 1)) {
            arguments[index].data = NULL;
            arguments[index].length = 0;
        } else {
            arguments[index].data = luaL_tolstring(L, index + 1, &arguments[index].length);
            bytes += (long long)arguments[index].length;
        }
    }
    // A call into Swift costs about what a hundred instructions do (a log line rather more), so a loop
    // of them is bounded like any other loop.
    starling_lua_charge(L, (selector == 0 ? 1000 : 100) + (bytes >> 5), "starling.* calls too expensive");
    starling_lua_value result = {0, 0, NULL, 0};
    int status = function(context, selector, arguments, count, &result);
    if (status != 0 || result.kind < 0) {
        lua_pushlstring(L, result.data ? result.data : "error", result.data ? result.length : 5);
        return lua_error(L);
    }
    switch (result.kind) {
    case 1:
        // Counts and the like come back as integers ("3", not "3.0", when printed).
        if (result.number == (double)(lua_Integer)result.number && result.number > -9e15 && result.number < 9e15) {
            lua_pushinteger(L, (lua_Integer)result.number);
        } else {
            lua_pushnumber(L, result.number);
        }
        break;
    case 2: lua_pushlstring(L, result.data, result.length); break;
    case 3: lua_pushboolean(L, result.number != 0); break;
    default: lua_pushnil(L); break;
    }
    return 1;
}

/// `setmetatable` without finalizers: Lua runs `__gc` with hooks off, where no budget could stop it.
/// Lua marks an object for finalization only if `__gc` is present when the metatable is set, so checking
/// here is enough.
static int sandbox_setmetatable(lua_State *L) {
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        int present = lua_rawget(L, 2) != LUA_TNIL;
        lua_pop(L, 1);
        if (present) return luaL_error(L, "setmetatable: __gc (finalizers) is not available in the sandbox");
    }
    lua_CFunction original = lua_tocfunction(L, lua_upvalueindex(1));
    return original(L);
}

/// Only the libraries that cannot reach the outside world, with every function whose cost grows with
/// its input bounded.
static void open_libraries(lua_State *L) {
    luaL_requiref(L, LUA_GNAME, luaopen_base, 1);
    luaL_requiref(L, LUA_TABLIBNAME, luaopen_table, 1);
    luaL_requiref(L, LUA_STRLIBNAME, luaopen_string, 1);
    luaL_requiref(L, LUA_MATHLIBNAME, luaopen_math, 1);
    luaL_requiref(L, LUA_UTF8LIBNAME, luaopen_utf8, 1);
    lua_pop(L, 5);
    static const char *const removed[] = {"dofile", "loadfile", "load", "require", "collectgarbage", "print", NULL};
    for (int index = 0; removed[index]; index++) {
        lua_pushnil(L);
        lua_setglobal(L, removed[index]);
    }
    lua_getglobal(L, "setmetatable");
    lua_pushcclosure(L, sandbox_setmetatable, 1);
    lua_setglobal(L, "setmetatable");
    lua_getglobal(L, "string");
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    starling_lua_install_patterns(L, lua_gettop(L));
    lua_pop(L, 1);
    starling_lua_install_costs(L);
}

// A stanza reaches a script as a table whose fields `name`, `attr` and `body` are filled from the stanza
// when first read (or listed by pairs), and `attr` looks each attribute up when read: a handler that
// looks at nothing costs no copying, one that reads `stanza.attr.to` copies that one value.

enum { STANZA_FIELD_NAME = 1, STANZA_FIELD_ATTR = 2, STANZA_FIELD_BODY = 4 };

static unsigned stanza_field(lua_State *L, int index) {
    if (lua_type(L, index) != LUA_TSTRING) return 0;
    size_t length = 0;
    const char *key = lua_tolstring(L, index, &length);
    if (length != 4) return 0;
    if (memcmp(key, "name", 4) == 0) return STANZA_FIELD_NAME;
    if (memcmp(key, "attr", 4) == 0) return STANZA_FIELD_ATTR;
    if (memcmp(key, "body", 4) == 0) return STANZA_FIELD_BODY;
    return 0;
}

static int is_current_stanza(starling_lua_sandbox *sandbox, lua_State *L, int index) {
    return sandbox->current_call != NULL && lua_topointer(L, index) == sandbox->current_stanza_table;
}

/// Pushes one part of the running call's stanza, or nothing (returning 0) when the stanza lacks it.
static int push_stanza_part(lua_State *L, starling_lua_sandbox *sandbox, starling_lua_stanza_part part, int index, starling_lua_string key) {
    const starling_lua_call *call = sandbox->current_call;
    long length = call->read_stanza(call->stanza, part, index, key, sandbox->scratch, sandbox->scratch_capacity);
    if (length < 0) return 0;
    if ((size_t)length > sandbox->scratch_capacity) {
        size_t capacity = (size_t)length < 256 ? 256 : (size_t)length;
        char *grown = (char *)realloc(sandbox->scratch, capacity);
        if (grown == NULL) return luaL_error(L, "not enough memory");
        sandbox->scratch = grown;
        sandbox->scratch_capacity = capacity;
        length = call->read_stanza(call->stanza, part, index, key, grown, capacity);
        if (length < 0 || (size_t)length > capacity) return 0;
    }
    lua_pushlstring(L, sandbox->scratch, (size_t)length);
    return 1;
}

static const starling_lua_string no_key = {NULL, 0};

static int is_current_attributes(starling_lua_sandbox *sandbox, lua_State *L, int index) {
    return sandbox->current_call != NULL && !sandbox->attributes_complete && lua_topointer(L, index) == sandbox->current_attributes_table;
}

/// Copies every attribute into the attr table at `table` (keys a script set with rawset stay as they are).
static void complete_attributes(lua_State *L, starling_lua_sandbox *sandbox, int table) {
    sandbox->attributes_complete = 1;
    const starling_lua_call *call = sandbox->current_call;
    long count = call->read_stanza(call->stanza, STARLING_LUA_STANZA_ATTRIBUTE_COUNT, 0, no_key, NULL, 0);
    for (int index = 0; index < count; index++) {
        if (!push_stanza_part(L, sandbox, STARLING_LUA_STANZA_ATTRIBUTE_NAME, index, no_key)) continue;
        lua_pushvalue(L, -1);
        if (lua_rawget(L, table) != LUA_TNIL || !push_stanza_part(L, sandbox, STARLING_LUA_STANZA_ATTRIBUTE_VALUE, index, no_key)) {
            lua_pop(L, 2);
            continue;
        }
        lua_remove(L, -2);
        lua_rawset(L, table);
    }
}

/// Reading `stanza.attr.x` asks the stanza each time rather than keeping the value in the table: an
/// assignment to a key present in the table would not reach __newindex, so a removed attribute could
/// come back from the stanza.
static int attributes_index(lua_State *L) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    if (lua_type(L, 2) != LUA_TSTRING || !is_current_attributes(sandbox, L, 1)) return 0;
    starling_lua_string key;
    key.data = lua_tolstring(L, 2, &key.length);
    return push_stanza_part(L, sandbox, STARLING_LUA_STANZA_ATTRIBUTE_NAMED, 0, key);
}

static int attributes_newindex(lua_State *L) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    if (is_current_attributes(sandbox, L, 1)) complete_attributes(L, sandbox, 1);
    lua_settop(L, 3);
    lua_rawset(L, 1);
    return 0;
}

/// What `pairs(t)` returns: `next` (as it was before any script ran, the metamethod's upvalue), t, nil.
static int return_next(lua_State *L) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    return 3;
}

static int attributes_pairs(lua_State *L) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    if (is_current_attributes(sandbox, L, 1)) complete_attributes(L, sandbox, 1);
    return return_next(L);
}

/// Sets `field` of the stanza table at `table` from the stanza (raw, so __newindex does not see it).
static void fill_stanza_field(lua_State *L, starling_lua_sandbox *sandbox, int table, unsigned field) {
    sandbox->stanza_fields_touched |= field;
    if (field == STANZA_FIELD_ATTR) {
        lua_pushliteral(L, "attr");
        lua_createtable(L, 0, 0);
        lua_rawgeti(L, LUA_REGISTRYINDEX, sandbox->attributes_metatable_ref);
        lua_setmetatable(L, -2);
        sandbox->current_attributes_table = lua_topointer(L, -1);
        sandbox->attributes_complete = 0;
    } else {
        int name = field == STANZA_FIELD_NAME;
        lua_pushstring(L, name ? "name" : "body");
        if (!push_stanza_part(L, sandbox, name ? STARLING_LUA_STANZA_NAME : STARLING_LUA_STANZA_BODY, 0, no_key)) {
            lua_pop(L, 1); /* no such part: the field stays nil */
            return;
        }
    }
    lua_rawset(L, table);
}

static int stanza_index(lua_State *L) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    unsigned field = stanza_field(L, 2);
    if (field == 0 || (sandbox->stanza_fields_touched & field) || !is_current_stanza(sandbox, L, 1)) return 0;
    fill_stanza_field(L, sandbox, 1, field);
    lua_settop(L, 2);
    lua_rawget(L, 1);
    return 1;
}

/// An assignment to a field not read yet (`stanza.body = nil`) must not be undone by a later read.
static int stanza_newindex(lua_State *L) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    unsigned field = stanza_field(L, 2);
    if (field != 0 && is_current_stanza(sandbox, L, 1)) sandbox->stanza_fields_touched |= field;
    lua_settop(L, 3);
    lua_rawset(L, 1);
    return 0;
}

static int stanza_pairs(lua_State *L) {
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    if (is_current_stanza(sandbox, L, 1)) {
        for (unsigned field = STANZA_FIELD_NAME; field <= STANZA_FIELD_BODY; field <<= 1) {
            if (!(sandbox->stanza_fields_touched & field)) fill_stanza_field(L, sandbox, 1, field);
        }
    }
    return return_next(L);
}

static int new_view_metatable(lua_State *L, lua_CFunction index, lua_CFunction newindex, lua_CFunction pairs, const char *name) {
    lua_createtable(L, 0, 4);
    lua_pushcfunction(L, index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, newindex);
    lua_setfield(L, -2, "__newindex");
    lua_getglobal(L, "next");
    lua_pushcclosure(L, pairs, 1);
    lua_setfield(L, -2, "__pairs");
    // Scripts can neither read it (to give other tables these fields) nor replace it.
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__metatable");
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

static void create_stanza_metatables(lua_State *L, starling_lua_sandbox *sandbox) {
    sandbox->stanza_metatable_ref = new_view_metatable(L, stanza_index, stanza_newindex, stanza_pairs, "stanza");
    sandbox->attributes_metatable_ref = new_view_metatable(L, attributes_index, attributes_newindex, attributes_pairs, "attributes");
}

static int open_protected(lua_State *L) {
    const starling_lua_open *open = (const starling_lua_open *)lua_touserdata(L, 1);
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    open_libraries(L);
    lua_settop(L, 1);

    lua_createtable(L, 0, open->function_count);
    for (int index = 0; index < open->function_count; index++) {
        lua_pushlightuserdata(L, (void *)open->function);
        lua_pushlightuserdata(L, open->context);
        lua_pushinteger(L, index);
        lua_pushcclosure(L, swift_dispatch, 3);
        lua_setfield(L, -2, open->function_names[index]);
    }
    lua_setglobal(L, "starling");
    create_stanza_metatables(L, sandbox);

    if (luaL_loadbufferx(L, open->prelude.data, open->prelude.length, "=starling", "t") != LUA_OK) return lua_error(L);
    lua_call(L, 0, 2);
    // Kept in the registry, where scripts cannot replace them.
    sandbox->handler_list_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    sandbox->dispatch_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (luaL_loadbufferx(L, open->script.data, open->script.length, open->chunk_name, "t") != LUA_OK) return lua_error(L);
    lua_call(L, 0, 0);
    return 0;
}

static starling_lua_sandbox *new_sandbox(const starling_lua_limits *limits, char **error) {
    starling_lua_sandbox *sandbox = (starling_lua_sandbox *)calloc(1, sizeof(starling_lua_sandbox));
    if (sandbox == NULL) {
        *error = copy_text("not enough memory for a Lua state", 33);
        return NULL;
    }
    sandbox->cap = limits->memory;
    sandbox->budget = limits->instructions > 0 ? limits->instructions : 1;
    sandbox->cpu_limit_ns = (uint64_t)(limits->time_limit * 1e9);
    sandbox->watchdog_ns = (uint64_t)(limits->watchdog * 1e9);
    sandbox->dispatch_ref = LUA_NOREF;
    sandbox->handler_list_ref = LUA_NOREF;
    sandbox->stanza_metatable_ref = LUA_NOREF;
    sandbox->attributes_metatable_ref = LUA_NOREF;
    sandbox->L = lua_newstate(sandbox_alloc, sandbox);
    if (sandbox->L == NULL) {
        free(sandbox);
        *error = copy_text("not enough memory for a Lua state", 33);
        return NULL;
    }
    return sandbox;
}

starling_lua_sandbox *starling_lua_sandbox_open(const starling_lua_limits *limits, const starling_lua_open *open, char **error) {
    *error = NULL;
    starling_lua_sandbox *sandbox = new_sandbox(limits, error);
    if (sandbox == NULL) return NULL;
    if (protected_call(sandbox, open_protected, (void *)open, error) != LUA_OK) {
        starling_lua_sandbox_close(sandbox);
        return NULL;
    }
    return sandbox;
}

void starling_lua_sandbox_close(starling_lua_sandbox *sandbox) {
    lua_close(sandbox->L);
    free(sandbox->scratch);
    free(sandbox);
}

size_t starling_lua_sandbox_memory(const starling_lua_sandbox *sandbox) { return sandbox->used; }
size_t starling_lua_sandbox_memory_cap(const starling_lua_sandbox *sandbox) { return sandbox->cap; }

void starling_lua_call_free(starling_lua_call *call) {
    free(call->condition);
    free(call->text);
    for (int index = 0; index < call->result_attribute_count * 2; index++) free(call->result_attributes[index]);
    free(call->result_attributes);
    free(call->result_body);
    free(call->error);
    free(call->slow_location);
    for (int index = 0; index < call->result_field_count; index++) free((void *)call->result_fields[index].text.data);
    free(call->result_fields);
    call->result_fields = NULL;
    call->result_field_count = 0;
    call->condition = call->text = call->result_body = call->error = call->slow_location = NULL;
    call->result_attributes = NULL;
    call->result_attribute_count = 0;
}

static char *field_copy(lua_State *L, int index) {
    size_t length = 0;
    const char *value = lua_tolstring(L, index, &length);
    return value ? copy_text(value, length) : NULL;
}

static void push_field(lua_State *L, const starling_lua_field *field) {
    switch (field->kind) {
    case 1: lua_pushnumber(L, field->number); break;
    case 2: lua_pushboolean(L, field->number != 0); break;
    default: lua_pushlstring(L, field->text.data, field->text.length); break;
    }
}

/// After "modify": the fields the call passed in, as the returned event table (at index 2) holds them now.
static void read_back_tables(lua_State *L, starling_lua_call *call) {
    int total = 0;
    for (int index = 0; index < call->table_count; index++) total += call->tables[index].field_count;
    if (total == 0) return;
    call->result_fields = (starling_lua_field *)calloc((size_t)total, sizeof(starling_lua_field));
    if (call->result_fields == NULL) return;
    call->result_field_count = total;
    int out = 0;
    for (int index = 0; index < call->table_count; index++) {
        const starling_lua_table *table = &call->tables[index];
        int nested = table->name.length > 0;
        int container = 2;
        if (nested) {
            lua_pushlstring(L, table->name.data, table->name.length);
            if (lua_rawget(L, 2) != LUA_TTABLE) {
                lua_pop(L, 1);
                for (int field = 0; field < table->field_count; field++) call->result_fields[out++].kind = -1;
                continue;
            }
            container = lua_gettop(L);
        }
        for (int field = 0; field < table->field_count; field++) {
            starling_lua_field *result = &call->result_fields[out++];
            result->key = table->fields[field].key;
            lua_pushlstring(L, table->fields[field].key.data, table->fields[field].key.length);
            switch (lua_rawget(L, container)) {
            case LUA_TSTRING: {
                size_t length = 0;
                const char *text = lua_tolstring(L, -1, &length);
                result->kind = 0;
                result->text.data = copy_text(text, length);
                result->text.length = length;
                break;
            }
            case LUA_TNUMBER:
                result->kind = 1;
                result->number = lua_tonumber(L, -1);
                break;
            case LUA_TBOOLEAN:
                result->kind = 2;
                result->number = lua_toboolean(L, -1);
                break;
            default:
                result->kind = -1;
                break;
            }
            lua_pop(L, 1);
        }
        if (nested) lua_pop(L, 1);
    }
}

static int call_protected(lua_State *L) {
    starling_lua_call *call = (starling_lua_call *)lua_touserdata(L, 1);
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    lua_settop(L, 0);
    lua_rawgeti(L, LUA_REGISTRYINDEX, sandbox->dispatch_ref);
    lua_pushlstring(L, call->event.data, call->event.length);
    lua_pushinteger(L, (lua_Integer)call->priority);
    lua_createtable(L, 0, 3);
    lua_rawgeti(L, LUA_REGISTRYINDEX, sandbox->stanza_metatable_ref);
    lua_setmetatable(L, -2);
    sandbox->current_call = call;
    sandbox->current_stanza_table = lua_topointer(L, -1);
    sandbox->current_attributes_table = NULL;
    sandbox->stanza_fields_touched = 0;
    for (int index = 0; index < call->table_count; index++) {
        const starling_lua_table *table = &call->tables[index];
        int nested = table->name.length > 0;
        if (nested) {
            lua_pushlstring(L, table->name.data, table->name.length);
            lua_createtable(L, 0, table->field_count);
        }
        for (int field = 0; field < table->field_count; field++) {
            lua_pushlstring(L, table->fields[field].key.data, table->fields[field].key.length);
            push_field(L, &table->fields[field]);
            lua_rawset(L, -3);
        }
        if (nested) lua_rawset(L, -3);
    }
    lua_call(L, 3, 3); /* verdict, condition or stanza, text */
    const char *verdict = lua_tostring(L, 1);
    if (verdict == NULL || strcmp(verdict, "pass") == 0) {
        call->verdict = 0;
    } else if (strcmp(verdict, "drop") == 0) {
        call->verdict = 1;
    } else if (strcmp(verdict, "allow") == 0) {
        call->verdict = 4;
    } else if (strcmp(verdict, "error") == 0) {
        call->verdict = 2;
        call->condition = field_copy(L, 2);
        call->text = field_copy(L, 3);
    } else if (strcmp(verdict, "kick") == 0) {
        call->verdict = 5;
        call->text = field_copy(L, 2);
    } else if (strcmp(verdict, "modify") == 0 && lua_istable(L, 2)) {
        call->verdict = 3;
        read_back_tables(L, call);
        if (lua_getfield(L, 2, "attr") == LUA_TTABLE) {
            if (is_current_attributes(sandbox, L, 4)) complete_attributes(L, sandbox, 4);
            int count = 0;
            lua_pushnil(L);
            while (lua_next(L, 4) != 0) {
                count++;
                lua_pop(L, 1);
            }
            call->result_attributes = (char **)calloc((size_t)(count * 2 + 1), sizeof(char *));
            lua_pushnil(L);
            while (call->result_attributes && lua_next(L, 4) != 0 && call->result_attribute_count < count) {
                if (lua_type(L, -2) == LUA_TSTRING && (lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER)) {
                    lua_pushvalue(L, -2);
                    call->result_attributes[call->result_attribute_count * 2] = field_copy(L, -1);
                    lua_pop(L, 1);
                    call->result_attributes[call->result_attribute_count * 2 + 1] = field_copy(L, -1);
                    call->result_attribute_count++;
                }
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 2, "body") == LUA_TSTRING) {
            call->result_has_body = 1;
            call->result_body = field_copy(L, -1);
        }
        lua_pop(L, 1);
    } else {
        return luaL_error(L, "a handler returned '%s': expected pass, drop, error, modify, allow or kick", verdict);
    }
    return 0;
}

int starling_lua_sandbox_invoke(starling_lua_sandbox *sandbox, starling_lua_call *call) {
    int status = protected_call(sandbox, call_protected, call, &call->error);
    sandbox->current_call = NULL;
    sandbox->current_stanza_table = NULL;
    sandbox->current_attributes_table = NULL;
    call->stop = status == LUA_OK ? STARLING_LUA_RAN : sandbox->stopped;
    call->elapsed = (double)(clock_ns(CLOCK_MONOTONIC) - sandbox->wall_started_ns) / 1e9;
    if (sandbox->slow_location[0]) call->slow_location = copy_text(sandbox->slow_location, strlen(sandbox->slow_location));
    return status;
}

typedef struct handler_list {
    char *text;
} handler_list;

static int handlers_protected(lua_State *L) {
    handler_list *list = (handler_list *)lua_touserdata(L, 1);
    starling_lua_sandbox *sandbox = starling_lua_sandbox_of(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, sandbox->handler_list_ref);
    lua_call(L, 0, 1);
    size_t length = 0;
    const char *text = lua_tolstring(L, -1, &length);
    if (text) list->text = copy_text(text, length);
    return 0;
}

char *starling_lua_sandbox_handlers(starling_lua_sandbox *sandbox) {
    handler_list list = {NULL};
    if (protected_call(sandbox, handlers_protected, &list, NULL) != LUA_OK) {
        free(list.text);
        return NULL;
    }
    return list.text;
}

typedef struct compare_request {
    starling_lua_string source;
    char *result;
} compare_request;

static int compare_protected(lua_State *L) {
    compare_request *request = (compare_request *)lua_touserdata(L, 1);
    luaL_requiref(L, LUA_GNAME, luaopen_base, 1);
    luaL_requiref(L, LUA_TABLIBNAME, luaopen_table, 1);
    luaL_requiref(L, LUA_STRLIBNAME, luaopen_string, 1);
    luaL_requiref(L, LUA_MATHLIBNAME, luaopen_math, 1);
    lua_pop(L, 4);
    lua_newtable(L);
    starling_lua_install_patterns(L, lua_gettop(L));
    lua_setglobal(L, "bounded");
    if (luaL_loadbufferx(L, request->source.data, request->source.length, "=compare", "t") != LUA_OK) return lua_error(L);
    lua_call(L, 0, 1);
    size_t length = 0;
    const char *text = lua_tolstring(L, -1, &length);
    request->result = copy_text(text ? text : "", text ? length : 0);
    return 0;
}

char *starling_lua_pattern_compare(const starling_lua_limits *limits, starling_lua_string source, int *failed) {
    char *error = NULL;
    starling_lua_sandbox *sandbox = new_sandbox(limits, &error);
    if (sandbox == NULL) {
        *failed = 1;
        return error;
    }
    compare_request request = {source, NULL};
    *failed = protected_call(sandbox, compare_protected, &request, &error) != LUA_OK;
    starling_lua_sandbox_close(sandbox);
    if (*failed) {
        free(request.result);
        return error;
    }
    return request.result;
}
