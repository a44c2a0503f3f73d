// Reading Lua data files (Prosody's storage format) into JSON, for the importer: Lua itself parses them,
// with nothing but the one function such files call.
#include "sandbox_internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct json_buffer {
    char *data;
    size_t length;
    size_t capacity;
    int failed;
} json_buffer;

static void append(json_buffer *buffer, const char *text, size_t length) {
    if (buffer->failed) return;
    if (buffer->length + length + 1 > buffer->capacity) {
        size_t capacity = buffer->capacity ? buffer->capacity : 4096;
        while (buffer->length + length + 1 > capacity) capacity *= 2;
        char *grown = realloc(buffer->data, capacity);
        if (!grown) { buffer->failed = 1; return; }
        buffer->data = grown;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->length, text, length);
    buffer->length += length;
    buffer->data[buffer->length] = 0;
}

static void append_text(json_buffer *buffer, const char *text) { append(buffer, text, strlen(text)); }

/// Every byte becomes the character with that code, so any bytes survive the trip through JSON.
static void append_string(json_buffer *buffer, const char *data, size_t length) {
    append(buffer, "\"", 1);
    for (size_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)data[i];
        if (c == '"' || c == '\\') {
            char escaped[2] = {'\\', (char)c};
            append(buffer, escaped, 2);
        } else if (c < 0x20 || c >= 0x7F) {
            char escaped[7];
            snprintf(escaped, sizeof escaped, "\\u%04x", c);
            append(buffer, escaped, 6);
        } else {
            append(buffer, (const char *)&c, 1);
        }
    }
    append(buffer, "\"", 1);
}

static int append_value(lua_State *L, int index, json_buffer *buffer, int depth) {
    if (depth > 64) return -1;
    index = lua_absindex(L, index);
    switch (lua_type(L, index)) {
    case LUA_TNIL: append_text(buffer, "null"); return 0;
    case LUA_TBOOLEAN: append_text(buffer, lua_toboolean(L, index) ? "true" : "false"); return 0;
    case LUA_TNUMBER: {
        char number[64];
        if (lua_isinteger(L, index)) snprintf(number, sizeof number, "%lld", (long long)lua_tointeger(L, index));
        else snprintf(number, sizeof number, "%.17g", (double)lua_tonumber(L, index));
        append_text(buffer, number);
        return 0;
    }
    case LUA_TSTRING: {
        size_t length;
        const char *data = lua_tolstring(L, index, &length);
        append_string(buffer, data, length);
        return 0;
    }
    case LUA_TTABLE: {
        append_text(buffer, "{\"t\":[");
        int first = 1;
        lua_pushnil(L);
        while (lua_next(L, index) != 0) {
            if (!first) append_text(buffer, ",");
            first = 0;
            append_text(buffer, "[");
            if (append_value(L, -2, buffer, depth + 1) != 0) { lua_pop(L, 2); return -1; }
            append_text(buffer, ",");
            if (append_value(L, -1, buffer, depth + 1) != 0) { lua_pop(L, 2); return -1; }
            append_text(buffer, "]");
            lua_pop(L, 1);
        }
        append_text(buffer, "]}");
        return 0;
    }
    default:
        return -2;
    }
}

static int collect_item(lua_State *L) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    return 0;
}

static void stop_runaway(lua_State *L, lua_Debug *debug) {
    (void)debug;
    luaL_error(L, "the file runs too long for a data file");
}

static char *copy_text(const char *text) {
    size_t length = strlen(text);
    char *copy = malloc(length + 1);
    if (copy) memcpy(copy, text, length + 1);
    return copy;
}

char *starling_lua_read_data(starling_lua_string source, const char *chunk_name, long long instruction_limit, char **error) {
    *error = NULL;
    lua_State *L = luaL_newstate();
    if (!L) { *error = copy_text("cannot create a Lua state"); return NULL; }
    // The items of a list file, in order.
    lua_newtable(L);
    int items = lua_gettop(L);
    // Text only (no bytecode), with an environment that holds nothing but `item`.
    if (luaL_loadbufferx(L, source.data, source.length, chunk_name, "t") != LUA_OK) {
        *error = copy_text(lua_tostring(L, -1));
        lua_close(L);
        return NULL;
    }
    lua_newtable(L);
    lua_pushvalue(L, items);
    lua_pushcclosure(L, collect_item, 1);
    lua_setfield(L, -2, "item");
    if (!lua_setupvalue(L, -2, 1)) lua_pop(L, 1);
    int limit = instruction_limit > 0x7FFFFFFF ? 0x7FFFFFFF : (int)instruction_limit;
    lua_sethook(L, stop_runaway, LUA_MASKCOUNT, limit > 0 ? limit : 1);
    if (lua_pcall(L, 0, 1, 0) != LUA_OK) {
        *error = copy_text(lua_tostring(L, -1) ? lua_tostring(L, -1) : "error");
        lua_close(L);
        return NULL;
    }
    lua_sethook(L, NULL, 0, 0);
    json_buffer buffer = {0};
    int value = lua_isnil(L, -1) ? items : lua_gettop(L);
    int status = append_value(L, value, &buffer, 0);
    lua_close(L);
    if (status != 0 || buffer.failed) {
        free(buffer.data);
        *error = copy_text(status == -2 ? "the file holds a value that is not data (a function?)" : "the data is nested too deeply or too large");
        return NULL;
    }
    return buffer.data;
}
