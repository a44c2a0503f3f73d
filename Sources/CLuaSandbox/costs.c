// Library functions whose work grows with their arguments without allocating (allocation is charged by
// the allocator): each is wrapped so that it first draws its cost from the call's budget. Without this,
// one VM instruction could start millions of steps of C work (`string.rep("", 1e15)` loops 10^15 times,
// and a loop of `table.insert(t, 1, x)` over a big table is quadratic).
#include "sandbox_internal.h"
#include <math.h>
#include <string.h>

typedef enum cost {
    /// string.rep: one unit per copy plus the bytes written.
    COST_REPEAT,
    /// string.byte, utf8.codepoint: one unit per value pushed (the range of arguments 2 and 3).
    COST_STRING_RANGE,
    /// string.char, utf8.char: one unit per argument.
    COST_ARGUMENTS,
    /// utf8.len, utf8.offset, tonumber, string.packsize: the bytes scanned (a unit per four).
    COST_SCAN,
    /// string.pack, string.unpack: one unit per format byte (each item pushes or writes at most one
    /// value) plus the bytes scanned.
    COST_FORMAT,
    /// table.insert with a position, table.remove with a position: the elements shifted (the table's
    /// length). Appending and removing the last element cost one unit.
    COST_INSERT,
    COST_REMOVE,
    /// table.sort: n log n comparisons (a Lua comparator also counts its own instructions).
    COST_SORT,
    /// table.unpack (arguments 2 and 3), table.concat (arguments 3 and 4): the elements visited.
    COST_TABLE_RANGE_UNPACK,
    COST_TABLE_RANGE_CONCAT,
    /// table.move: the elements moved.
    COST_MOVE
} cost;

static long long clamp_units(double units) {
    if (!(units < 9e18)) return (long long)9e18;
    return units < 1 ? 1 : (long long)units;
}

/// The length Lua's table functions would use (`#t`, honouring __len), or -1 when the value is neither
/// a table nor a string (the function itself then raises its usual error).
static double length_of(lua_State *L, int index) {
    int type = lua_type(L, index);
    if (type != LUA_TTABLE && type != LUA_TSTRING) return -1;
    return (double)luaL_len(L, index);
}

static int integer_argument(lua_State *L, int index, lua_Integer fallback, lua_Integer *value) {
    if (lua_isnoneornil(L, index)) {
        *value = fallback;
        return 1;
    }
    int ok = 0;
    *value = lua_tointegerx(L, index, &ok);
    return ok;
}

static double scanned_bytes(lua_State *L, int from) {
    double bytes = 0;
    int top = lua_gettop(L);
    for (int index = from; index <= top; index++) {
        if (lua_type(L, index) == LUA_TSTRING) bytes += (double)lua_rawlen(L, index);
    }
    return bytes;
}

static lua_Integer from_end(lua_Integer position, lua_Integer length) {
    if (position >= 0) return position;
    if (-position > length) return 0;
    return length + position + 1;
}

static long long cost_of(lua_State *L, cost kind) {
    lua_Integer first, last;
    double length;
    switch (kind) {
    case COST_REPEAT: {
        lua_Integer copies;
        if (lua_type(L, 1) != LUA_TSTRING || !integer_argument(L, 2, 0, &copies) || copies <= 0) return 1;
        double separator = lua_type(L, 3) == LUA_TSTRING ? (double)lua_rawlen(L, 3) : 0;
        return clamp_units((double)copies + ((double)copies * (double)lua_rawlen(L, 1) + (double)(copies - 1) * separator) / 32);
    }
    case COST_STRING_RANGE: {
        if (lua_type(L, 1) != LUA_TSTRING) return 1;
        lua_Integer size = (lua_Integer)lua_rawlen(L, 1);
        if (!integer_argument(L, 2, 1, &first) || !integer_argument(L, 3, first, &last)) return 1;
        first = from_end(first, size);
        last = from_end(last, size);
        if (first < 1) first = 1;
        if (last > size) last = size;
        return clamp_units((double)last - (double)first + 1 + (double)size / 64);
    }
    case COST_ARGUMENTS:
        return clamp_units(lua_gettop(L));
    case COST_SCAN:
        return clamp_units(scanned_bytes(L, 1) / 4);
    case COST_FORMAT:
        return clamp_units((lua_type(L, 1) == LUA_TSTRING ? (double)lua_rawlen(L, 1) : 0) + scanned_bytes(L, 2) / 32);
    case COST_INSERT:
    case COST_REMOVE:
        if (lua_gettop(L) < (kind == COST_INSERT ? 3 : 2) || lua_type(L, 1) != LUA_TTABLE) return 1;
        return clamp_units(length_of(L, 1));
    case COST_SORT:
        if (lua_type(L, 1) != LUA_TTABLE) return 1;
        length = length_of(L, 1);
        return clamp_units(length * (log2(length + 1) + 1));
    case COST_TABLE_RANGE_UNPACK:
    case COST_TABLE_RANGE_CONCAT: {
        int from = kind == COST_TABLE_RANGE_UNPACK ? 2 : 3;
        if (!integer_argument(L, from, 1, &first)) return 1;
        if (lua_isnoneornil(L, from + 1)) {
            length = length_of(L, 1);
            if (length < 0) return 1;
            return clamp_units(length - (double)first + 1);
        }
        if (!integer_argument(L, from + 1, 0, &last)) return 1;
        return clamp_units((double)last - (double)first + 1);
    }
    case COST_MOVE:
        if (!integer_argument(L, 2, 0, &first) || !integer_argument(L, 3, 0, &last)) return 1;
        return clamp_units((double)last - (double)first + 1);
    }
    return 1;
}

/// The wrapper: upvalues are the original C function, its cost kind and the message naming it.
static int charged_call(lua_State *L) {
    lua_CFunction original = lua_tocfunction(L, lua_upvalueindex(1));
    cost kind = (cost)lua_tointeger(L, lua_upvalueindex(2));
    starling_lua_charge(L, cost_of(L, kind), lua_tostring(L, lua_upvalueindex(3)));
    // The library functions wrapped here read only their arguments (no upvalues), so they can run in
    // this frame.
    return original(L);
}

void starling_lua_install_costs(lua_State *L) {
    static const struct {
        const char *library; /* NULL for the base library */
        const char *name;
        cost kind;
    } wrapped[] = {
        {"string", "rep", COST_REPEAT},
        {"string", "byte", COST_STRING_RANGE},
        {"string", "char", COST_ARGUMENTS},
        {"string", "pack", COST_FORMAT},
        {"string", "unpack", COST_FORMAT},
        {"string", "packsize", COST_SCAN},
        {"utf8", "len", COST_SCAN},
        {"utf8", "offset", COST_SCAN},
        {"utf8", "codepoint", COST_STRING_RANGE},
        {"utf8", "char", COST_ARGUMENTS},
        {"table", "insert", COST_INSERT},
        {"table", "remove", COST_REMOVE},
        {"table", "sort", COST_SORT},
        {"table", "unpack", COST_TABLE_RANGE_UNPACK},
        {"table", "concat", COST_TABLE_RANGE_CONCAT},
        {"table", "move", COST_MOVE},
        {NULL, "tonumber", COST_SCAN},
    };
    for (size_t index = 0; index < sizeof wrapped / sizeof wrapped[0]; index++) {
        if (wrapped[index].library) lua_getglobal(L, wrapped[index].library);
        else lua_pushglobaltable(L);
        lua_getfield(L, -1, wrapped[index].name);
        if (lua_iscfunction(L, -1)) {
            lua_pushinteger(L, wrapped[index].kind);
            if (wrapped[index].library) lua_pushfstring(L, "%s.%s too expensive", wrapped[index].library, wrapped[index].name);
            else lua_pushfstring(L, "%s too expensive", wrapped[index].name);
            lua_pushcclosure(L, charged_call, 3);
            lua_setfield(L, -2, wrapped[index].name);
        } else {
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
}
