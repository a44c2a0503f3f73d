#ifndef STARLING_CLUA_SHIM_H
#define STARLING_CLUA_SHIM_H
// Everything that touches the Lua API lives here, in C: a Lua error is a longjmp and must never cross
// a Swift frame. Swift only fills and reads the plain structs below; every Lua call that can fail runs
// inside lua_pcall.
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

typedef struct starling_lua_string {
    const char *data;
    size_t length;
} starling_lua_string;

/// Memory accounting for one state: the allocator refuses to go past `cap` (Lua then raises "not
/// enough memory" in the script, and the state stays usable).
typedef struct starling_lua_limits {
    size_t used;
    size_t cap;
} starling_lua_limits;

static void *starling_lua_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    starling_lua_limits *limits = (starling_lua_limits *)ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        limits->used -= old;
        return NULL;
    }
    if (nsize > old && limits->used + (nsize - old) > limits->cap) return NULL;
    void *block = realloc(ptr, nsize);
    if (block != NULL) limits->used = limits->used - old + nsize;
    return block;
}

static char *starling_lua_copy(const char *data, size_t length) {
    char *copy = (char *)malloc(length + 1);
    if (copy == NULL) return NULL;
    memcpy(copy, data, length);
    copy[length] = 0;
    return copy;
}

/// Fires once the call has run its instruction budget: stops it with the script's file and line.
static void starling_lua_budget_hook(lua_State *L, lua_Debug *ar) {
    lua_sethook(L, NULL, 0, 0);
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0) {
        luaL_error(L, "%s:%d: instruction budget exceeded", ar->short_src, ar->currentline);
    }
    luaL_error(L, "instruction budget exceeded");
}

/// A function Swift provides to scripts (`starling.log`, `starling.incr`, ...). It reads up to 4 string
/// arguments and sets `result`; it returns 0, or -1 with an error message in `result` (raised as a Lua
/// error here, in C).
typedef struct starling_lua_value {
    int kind; /* 0 nil, 1 number, 2 string, 3 boolean, -1 error (message in data) */
    double number;
    const char *data;
    size_t length;
} starling_lua_value;
typedef int (*starling_lua_swift_function)(void *context, int function, const starling_lua_string *arguments, int count,
                                           starling_lua_value *result);

static int starling_lua_dispatch(lua_State *L) {
    starling_lua_swift_function function = (starling_lua_swift_function)lua_touserdata(L, lua_upvalueindex(1));
    void *context = lua_touserdata(L, lua_upvalueindex(2));
    int selector = (int)lua_tointeger(L, lua_upvalueindex(3));
    starling_lua_string arguments[4];
    int count = lua_gettop(L);
    if (count > 4) count = 4;
    for (int index = 0; index < count; index++) {
        if (lua_isnil(L, index + 1)) {
            arguments[index].data = NULL;
            arguments[index].length = 0;
        } else {
            arguments[index].data = luaL_tolstring(L, index + 1, &arguments[index].length);
        }
    }
    starling_lua_value result = {0, 0, NULL, 0};
    int status = function(context, selector, arguments, count, &result);
    if (status != 0 || result.kind < 0) {
        lua_pushlstring(L, result.data ? result.data : "error", result.data ? result.length : 5);
        return lua_error(L);
    }
    switch (result.kind) {
    case 1: lua_pushnumber(L, result.number); break;
    case 2: lua_pushlstring(L, result.data, result.length); break;
    case 3: lua_pushboolean(L, result.number != 0); break;
    default: lua_pushnil(L); break;
    }
    return 1;
}

typedef struct starling_lua_open {
    starling_lua_swift_function function;
    void *context;
    const char *const *function_names; /* installed as starling.<name>, selector = index */
    int function_count;
    starling_lua_string prelude;
    starling_lua_string script;
    const char *chunk_name;
} starling_lua_open;

static int starling_lua_open_protected(lua_State *L) {
    starling_lua_open *open = (starling_lua_open *)lua_touserdata(L, 1);
    // Only the libraries that cannot reach the outside world.
    luaL_requiref(L, LUA_GNAME, luaopen_base, 1);
    luaL_requiref(L, LUA_TABLIBNAME, luaopen_table, 1);
    luaL_requiref(L, LUA_STRLIBNAME, luaopen_string, 1);
    luaL_requiref(L, LUA_MATHLIBNAME, luaopen_math, 1);
    luaL_requiref(L, LUA_UTF8LIBNAME, luaopen_utf8, 1);
    lua_settop(L, 1);
    static const char *const removed[] = {"dofile", "loadfile", "load", "require", "collectgarbage", "print", NULL};
    for (int index = 0; removed[index]; index++) {
        lua_pushnil(L);
        lua_setglobal(L, removed[index]);
    }
    lua_getglobal(L, "string");
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);

    lua_createtable(L, 0, open->function_count);
    for (int index = 0; index < open->function_count; index++) {
        lua_pushlightuserdata(L, (void *)open->function);
        lua_pushlightuserdata(L, open->context);
        lua_pushinteger(L, index);
        lua_pushcclosure(L, starling_lua_dispatch, 3);
        lua_setfield(L, -2, open->function_names[index]);
    }
    lua_setglobal(L, "starling");

    if (luaL_loadbufferx(L, open->prelude.data, open->prelude.length, "=starling", "t") != LUA_OK) return lua_error(L);
    lua_call(L, 0, 0);
    if (luaL_loadbufferx(L, open->script.data, open->script.length, open->chunk_name, "t") != LUA_OK) return lua_error(L);
    lua_call(L, 0, 0);
    return 0;
}

/// Calls `function(argument)` under lua_pcall with an instruction budget. On failure returns the Lua
/// status and a malloc'd message in *error (the caller frees it).
static int starling_lua_protected_call(lua_State *L, lua_CFunction function, void *argument, lua_Integer budget, char **error) {
    lua_settop(L, 0);
    lua_pushcfunction(L, function);
    lua_pushlightuserdata(L, argument);
    if (budget > 0) lua_sethook(L, starling_lua_budget_hook, LUA_MASKCOUNT, (int)budget);
    int status = lua_pcall(L, 1, 0, 0);
    lua_sethook(L, NULL, 0, 0);
    if (status != LUA_OK) {
        size_t length = 0;
        const char *message = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &length) : NULL;
        if (message == NULL) {
            message = status == LUA_ERRMEM ? "not enough memory" : "error without a message";
            length = strlen(message);
        }
        *error = starling_lua_copy(message, length);
    }
    lua_settop(L, 0);
    return status;
}

/// Opens a sandboxed state and runs the prelude and the script's top level (which registers its
/// handlers). On failure returns NULL and a malloc'd message in *error (the caller frees it).
static lua_State *starling_lua_open_state(starling_lua_limits *limits, starling_lua_open *open, lua_Integer budget, char **error) {
    *error = NULL;
    lua_State *L = lua_newstate(starling_lua_alloc, limits);
    if (L == NULL) {
        *error = starling_lua_copy("not enough memory for a Lua state", 33);
        return NULL;
    }
    if (starling_lua_protected_call(L, starling_lua_open_protected, open, budget, error) != LUA_OK) {
        lua_close(L);
        return NULL;
    }
    return L;
}

/// One hook call: the event, the stanza as name, attributes and body, and the priority whose handlers
/// run. The results are malloc'd; free them with starling_lua_call_free.
typedef struct starling_lua_call {
    starling_lua_string event;
    lua_Integer priority;
    starling_lua_string name;
    int attribute_count;
    const starling_lua_string *attributes; /* name, value, name, value, ... */
    starling_lua_string body;
    int has_body;

    int verdict; /* 0 pass, 1 drop, 2 error, 3 modify, 4 allow (authenticate) */
    char *condition;
    char *text;
    int result_attribute_count;
    char **result_attributes; /* name, value, ... */
    char *result_body;
    int result_has_body;
    char *error;
} starling_lua_call;

static void starling_lua_call_free(starling_lua_call *call) {
    free(call->condition);
    free(call->text);
    for (int index = 0; index < call->result_attribute_count * 2; index++) free(call->result_attributes[index]);
    free(call->result_attributes);
    free(call->result_body);
    free(call->error);
    call->condition = call->text = call->result_body = call->error = NULL;
    call->result_attributes = NULL;
    call->result_attribute_count = 0;
}

static char *starling_lua_field_copy(lua_State *L, int index) {
    size_t length = 0;
    const char *value = lua_tolstring(L, index, &length);
    return value ? starling_lua_copy(value, length) : NULL;
}

static int starling_lua_call_protected(lua_State *L) {
    starling_lua_call *call = (starling_lua_call *)lua_touserdata(L, 1);
    lua_settop(L, 0);
    lua_getglobal(L, "__starling_dispatch");
    lua_pushlstring(L, call->event.data, call->event.length);
    lua_pushinteger(L, call->priority);
    lua_createtable(L, 0, 3);
    lua_pushlstring(L, call->name.data, call->name.length);
    lua_setfield(L, -2, "name");
    lua_createtable(L, 0, call->attribute_count);
    for (int index = 0; index < call->attribute_count; index++) {
        lua_pushlstring(L, call->attributes[index * 2].data, call->attributes[index * 2].length);
        lua_pushlstring(L, call->attributes[index * 2 + 1].data, call->attributes[index * 2 + 1].length);
        lua_rawset(L, -3);
    }
    lua_setfield(L, -2, "attr");
    if (call->has_body) {
        lua_pushlstring(L, call->body.data, call->body.length);
        lua_setfield(L, -2, "body");
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
        call->condition = starling_lua_field_copy(L, 2);
        call->text = starling_lua_field_copy(L, 3);
    } else if (strcmp(verdict, "modify") == 0 && lua_istable(L, 2)) {
        call->verdict = 3;
        if (lua_getfield(L, 2, "attr") == LUA_TTABLE) {
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
                    call->result_attributes[call->result_attribute_count * 2] = starling_lua_field_copy(L, -1);
                    lua_pop(L, 1);
                    call->result_attributes[call->result_attribute_count * 2 + 1] = starling_lua_field_copy(L, -1);
                    call->result_attribute_count++;
                }
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 2, "body") == LUA_TSTRING) {
            call->result_has_body = 1;
            call->result_body = starling_lua_field_copy(L, -1);
        }
        lua_pop(L, 1);
    } else {
        return luaL_error(L, "a handler returned '%s': expected pass, drop, error, modify or allow", verdict);
    }
    return 0;
}

/// Runs the handlers of `call->event` at `call->priority` under an instruction budget. Returns the Lua
/// status; on failure call->error holds the message.
static int starling_lua_invoke(lua_State *L, starling_lua_call *call, lua_Integer budget) {
    return starling_lua_protected_call(L, starling_lua_call_protected, call, budget, &call->error);
}

/// The handlers a script registered, as "event priority" lines (read once after loading).
static char *starling_lua_handlers(lua_State *L) {
    lua_settop(L, 0);
    if (lua_getglobal(L, "__starling_handler_list") != LUA_TFUNCTION) {
        lua_settop(L, 0);
        return NULL;
    }
    if (lua_pcall(L, 0, 1, 0) != LUA_OK || lua_type(L, -1) != LUA_TSTRING) {
        lua_settop(L, 0);
        return NULL;
    }
    size_t length = 0;
    const char *text = lua_tolstring(L, -1, &length);
    char *copy = starling_lua_copy(text, length);
    lua_settop(L, 0);
    return copy;
}
#endif
