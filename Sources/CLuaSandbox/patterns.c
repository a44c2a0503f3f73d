// Lua's pattern functions (string.find, match, gmatch and gsub) with a matcher whose every step draws
// from the call's budget, so no pattern and subject can hold a thread: Lua's own matcher runs in C where
// the instruction count never looks, and backtracking patterns such as "a.-b.-c.-d" cost polynomial time.
//
// Written for Starling from the pattern language as the Lua 5.4 reference manual (section 6.4.1)
// defines it, and checked against Lua's own string library by the unit tests (same results and the
// same errors on generated patterns and subjects). Plain finds use memmem, which is linear.
#define _GNU_SOURCE
#include "sandbox_internal.h"
#include <ctype.h>
#include <string.h>

enum {
    MAX_CAPTURES = 32,       /* LUA_MAXCAPTURES */
    MAX_DEPTH = 200,         /* recursion, as Lua's MAXCCALLS for patterns */
    CAPTURE_OPEN = -1,
    CAPTURE_POSITION = -2,
    CLOCK_EVERY = 4096       /* steps between clock readings */
};

typedef struct capture {
    const char *start;
    ptrdiff_t length; /* or CAPTURE_OPEN, CAPTURE_POSITION */
} capture;

typedef struct matcher {
    lua_State *L;
    starling_lua_sandbox *sandbox;
    const char *subject;
    const char *subject_end;
    const char *pattern_end;
    /// For messages: "pattern too expensive in string.find".
    const char *what;
    int depth;
    int level;
    unsigned ticks;
    capture captures[MAX_CAPTURES];
} matcher;

static void prepare(matcher *m, lua_State *L, const char *subject, size_t subject_length, const char *pattern,
                    size_t pattern_length, const char *what) {
    m->L = L;
    m->sandbox = starling_lua_sandbox_of(L);
    m->subject = subject;
    m->subject_end = subject + subject_length;
    m->pattern_end = pattern + pattern_length;
    m->what = what;
    m->depth = MAX_DEPTH;
    m->level = 0;
    m->ticks = 0;
}

/// One unit of matching work.
static inline void step(matcher *m) {
    if (--m->sandbox->remaining <= 0) starling_lua_charge(m->L, 0, m->what);
    if ((++m->ticks % CLOCK_EVERY) == 0) starling_lua_check_clock(m->L, m->what);
}

static inline void charge_bytes(matcher *m, ptrdiff_t bytes) {
    if (bytes >= 32) starling_lua_charge(m->L, (long long)(bytes >> 5), m->what);
}

/// The end of the single-character class starting at `p` (`x`, `%x`, `.` or a set `[...]`).
static const char *class_end(matcher *m, const char *p) {
    const char *end = m->pattern_end;
    char c = *p++;
    if (c == '%') {
        if (p >= end) luaL_error(m->L, "malformed pattern (ends with '%%')");
        return p + 1;
    }
    if (c == '[') {
        if (p < end && *p == '^') p++;
        // The first member may be ']' itself, so the search for the closing one starts after it.
        do {
            if (p >= end) luaL_error(m->L, "malformed pattern (missing ']')");
            c = *p++;
            if (c == '%') {
                if (p >= end) luaL_error(m->L, "malformed pattern (missing ']')");
                p++;
            }
        } while (p >= end || *p != ']');
        return p + 1;
    }
    return p;
}

/// Whether byte `c` is in class `%<letter>` (an upper-case letter is the complement); any other
/// character after '%' stands for itself.
static int class_matches(int c, int letter) {
    int in;
    switch (tolower(letter)) {
    case 'a': in = isalpha(c); break;
    case 'c': in = iscntrl(c); break;
    case 'd': in = isdigit(c); break;
    case 'g': in = isgraph(c); break;
    case 'l': in = islower(c); break;
    case 'p': in = ispunct(c); break;
    case 's': in = isspace(c); break;
    case 'u': in = isupper(c); break;
    case 'w': in = isalnum(c); break;
    case 'x': in = isxdigit(c); break;
    default: return letter == c;
    }
    if (isupper(letter)) in = !in;
    return in != 0;
}

/// Whether byte `c` is in the set that opens at `p` ('[') and closes at `close` (']').
static int set_matches(int c, const char *p, const char *close) {
    int member = 1;
    p++;
    if (*p == '^') {
        member = 0;
        p++;
    }
    while (p < close) {
        if (*p == '%') {
            if (class_matches(c, (unsigned char)p[1])) return member;
            p += 2;
        } else if (p + 2 < close && p[1] == '-') {
            if ((unsigned char)p[0] <= c && c <= (unsigned char)p[2]) return member;
            p += 3;
        } else {
            if ((unsigned char)*p == c) return member;
            p++;
        }
    }
    return !member;
}

/// Whether the subject byte at `s` matches the single-character class `p`..`ep`.
static int single_match(matcher *m, const char *s, const char *p, const char *ep) {
    if (s >= m->subject_end) return 0;
    int c = (unsigned char)*s;
    switch (*p) {
    case '.': return 1;
    case '%': return class_matches(c, (unsigned char)p[1]);
    case '[': return set_matches(c, p, ep - 1);
    default: return (unsigned char)*p == c;
    }
}

static const char *do_match(matcher *m, const char *s, const char *p);

/// `%bxy`: a balanced run from x to its matching y.
static const char *match_balance(matcher *m, const char *s, const char *p) {
    if (p + 1 >= m->pattern_end) luaL_error(m->L, "malformed pattern (missing arguments to '%%b')");
    if (s >= m->subject_end || *s != p[0]) return NULL;
    char open = p[0], close = p[1];
    int depth = 1;
    while (++s < m->subject_end) {
        step(m);
        if (*s == close) {
            if (--depth == 0) return s + 1;
        } else if (*s == open) {
            depth++;
        }
    }
    return NULL;
}

/// `*` and `+`: as many as possible, then give back one at a time.
static const char *max_expand(matcher *m, const char *s, const char *p, const char *ep) {
    ptrdiff_t count = 0;
    while (single_match(m, s + count, p, ep)) {
        step(m);
        count++;
    }
    for (; count >= 0; count--) {
        const char *end = do_match(m, s + count, ep + 1);
        if (end) return end;
    }
    return NULL;
}

/// `-`: as few as possible, then take one more at a time.
static const char *min_expand(matcher *m, const char *s, const char *p, const char *ep) {
    for (;;) {
        const char *end = do_match(m, s, ep + 1);
        if (end) return end;
        if (!single_match(m, s, p, ep)) return NULL;
        s++;
    }
}

static const char *start_capture(matcher *m, const char *s, const char *p, ptrdiff_t kind) {
    if (m->level >= MAX_CAPTURES) luaL_error(m->L, "too many captures");
    m->captures[m->level].start = s;
    m->captures[m->level].length = kind;
    m->level++;
    const char *end = do_match(m, s, p);
    if (end == NULL) m->level--;
    return end;
}

static const char *end_capture(matcher *m, const char *s, const char *p) {
    int open = -1;
    for (int index = m->level - 1; index >= 0; index--) {
        if (m->captures[index].length == CAPTURE_OPEN) {
            open = index;
            break;
        }
    }
    if (open < 0) luaL_error(m->L, "invalid pattern capture");
    m->captures[open].length = s - m->captures[open].start;
    const char *end = do_match(m, s, p);
    if (end == NULL) m->captures[open].length = CAPTURE_OPEN;
    return end;
}

/// `%1`..`%9`: the same text as a closed capture.
static const char *match_back_reference(matcher *m, const char *s, int digit) {
    int index = digit - '1';
    if (index < 0 || index >= m->level || m->captures[index].length == CAPTURE_OPEN) {
        luaL_error(m->L, "invalid capture index %%%d", index + 1);
    }
    ptrdiff_t length = m->captures[index].length;
    if (length < 0) return NULL; /* a position capture matches no text */
    charge_bytes(m, length);
    if (m->subject_end - s >= length && memcmp(m->captures[index].start, s, (size_t)length) == 0) return s + length;
    return NULL;
}

/// Matches pattern `p` at subject position `s`; returns where the match ends, or NULL.
static const char *do_match(matcher *m, const char *s, const char *p) {
    if (m->depth-- == 0) luaL_error(m->L, "pattern too complex");
    const char *result;
    for (;;) {
        step(m);
        if (p == m->pattern_end) {
            result = s;
            break;
        }
        if (*p == '(') {
            if (p + 1 < m->pattern_end && p[1] == ')') result = start_capture(m, s, p + 2, CAPTURE_POSITION);
            else result = start_capture(m, s, p + 1, CAPTURE_OPEN);
            break;
        }
        if (*p == ')') {
            result = end_capture(m, s, p + 1);
            break;
        }
        if (*p == '$' && p + 1 == m->pattern_end) {
            result = s == m->subject_end ? s : NULL;
            break;
        }
        if (*p == '%' && p + 1 < m->pattern_end) {
            char next = p[1];
            if (next == 'b') {
                s = match_balance(m, s, p + 2);
                if (s != NULL) {
                    p += 4;
                    continue;
                }
                result = NULL;
                break;
            }
            if (next == 'f') {
                p += 2;
                if (p >= m->pattern_end || *p != '[') luaL_error(m->L, "missing '[' after '%%f' in pattern");
                const char *ep = class_end(m, p);
                int previous = s == m->subject ? 0 : (unsigned char)s[-1];
                int current = s < m->subject_end ? (unsigned char)*s : 0;
                if (!set_matches(previous, p, ep - 1) && set_matches(current, p, ep - 1)) {
                    p = ep;
                    continue;
                }
                result = NULL;
                break;
            }
            if (next >= '0' && next <= '9') {
                s = match_back_reference(m, s, next);
                if (s != NULL) {
                    p += 2;
                    continue;
                }
                result = NULL;
                break;
            }
        }
        // A single-character class, maybe with a quantifier.
        const char *ep = class_end(m, p);
        char quantifier = ep < m->pattern_end ? *ep : 0;
        if (!single_match(m, s, p, ep)) {
            if (quantifier == '*' || quantifier == '?' || quantifier == '-') {
                p = ep + 1;
                continue;
            }
            result = NULL;
            break;
        }
        if (quantifier == '?') {
            const char *end = do_match(m, s + 1, ep + 1);
            if (end) {
                result = end;
                break;
            }
            p = ep + 1;
            continue;
        }
        if (quantifier == '+') {
            result = max_expand(m, s + 1, p, ep);
            break;
        }
        if (quantifier == '*') {
            result = max_expand(m, s, p, ep);
            break;
        }
        if (quantifier == '-') {
            result = min_expand(m, s, p, ep);
            break;
        }
        s++;
        p = ep;
    }
    m->depth++;
    return result;
}

/// When the pattern must start with one literal byte (no class, no quantifier that allows zero of it),
/// that byte; otherwise -1. Positions without it cannot start a match, so scans skip to the next one
/// with memchr instead of trying each position.
static int required_first_byte(const char *p, const char *pattern_end) {
    if (p >= pattern_end) return -1;
    switch (*p) {
    case '^': case '$': case '*': case '+': case '?': case '.': case '(': case ')': case '[': case '%': case '-':
        return -1;
    default:
        break;
    }
    if (p + 1 < pattern_end && (p[1] == '*' || p[1] == '?' || p[1] == '-')) return -1;
    return (unsigned char)*p;
}

/// The first position from `s` where a match could start, given the required first byte (or `s` itself
/// when there is none); NULL when there is no such position before the end. Skipped bytes are charged.
static const char *next_candidate(matcher *m, const char *s, int first) {
    if (first < 0) return s;
    const char *found = (const char *)memchr(s, first, (size_t)(m->subject_end - s));
    charge_bytes(m, (found ? found : m->subject_end) - s);
    return found;
}

/// Pushes capture `index` (the whole match `s`..`e` when there are no captures).
static void push_capture(matcher *m, int index, const char *s, const char *e) {
    if (index >= m->level) {
        if (index != 0) luaL_error(m->L, "invalid capture index %%%d", index + 1);
        lua_pushlstring(m->L, s, (size_t)(e - s));
        return;
    }
    ptrdiff_t length = m->captures[index].length;
    if (length == CAPTURE_OPEN) luaL_error(m->L, "unfinished capture");
    if (length == CAPTURE_POSITION) {
        lua_pushinteger(m->L, (lua_Integer)(m->captures[index].start - m->subject) + 1);
    } else {
        lua_pushlstring(m->L, m->captures[index].start, (size_t)length);
    }
}

/// Pushes every capture (or the whole match when there are none and `s` is set); returns how many.
static int push_captures(matcher *m, const char *s, const char *e) {
    int count = (m->level == 0 && s != NULL) ? 1 : m->level;
    luaL_checkstack(m->L, count, "too many captures");
    for (int index = 0; index < count; index++) push_capture(m, index, s, e);
    return count;
}

/// Lua's rule for a start position: negative counts from the end, and anything before the start is 1.
static size_t start_position(lua_Integer position, size_t length) {
    if (position > 0) return (size_t)position;
    if (position == 0) return 1;
    if (position < -(lua_Integer)length) return 1;
    return length + (size_t)position + 1;
}

static int has_specials(const char *p, size_t length) {
    for (size_t index = 0; index < length; index++) {
        switch (p[index]) {
        case '^': case '$': case '*': case '+': case '?': case '.': case '(': case '[': case '%': case '-':
            return 1;
        default:
            break;
        }
    }
    return 0;
}

static int find_or_match(lua_State *L, int find) {
    size_t subject_length, pattern_length;
    const char *s = luaL_checklstring(L, 1, &subject_length);
    const char *p = luaL_checklstring(L, 2, &pattern_length);
    size_t init = start_position(luaL_optinteger(L, 3, 1), subject_length) - 1;
    if (init > subject_length) {
        luaL_pushfail(L);
        return 1;
    }
    if (find && (lua_toboolean(L, 4) || !has_specials(p, pattern_length))) {
        starling_lua_charge(L, 1 + (long long)((subject_length - init + pattern_length) >> 5), "plain string.find too expensive");
        const char *found = (const char *)memmem(s + init, subject_length - init, p, pattern_length);
        if (found != NULL) {
            lua_pushinteger(L, (lua_Integer)(found - s) + 1);
            lua_pushinteger(L, (lua_Integer)(found - s) + (lua_Integer)pattern_length);
            return 2;
        }
        luaL_pushfail(L);
        return 1;
    }
    int anchored = pattern_length > 0 && *p == '^';
    if (anchored) {
        p++;
        pattern_length--;
    }
    matcher m;
    prepare(&m, L, s, subject_length, p, pattern_length, find ? "pattern too expensive in string.find" : "pattern too expensive in string.match");
    const char *start = s + init;
    int first = anchored ? -1 : required_first_byte(p, m.pattern_end);
    for (;;) {
        start = next_candidate(&m, start, first);
        if (start == NULL) break;
        m.level = 0;
        m.depth = MAX_DEPTH;
        const char *end = do_match(&m, start, p);
        if (end != NULL) {
            if (find) {
                lua_pushinteger(L, (lua_Integer)(start - s) + 1);
                lua_pushinteger(L, (lua_Integer)(end - s));
                return push_captures(&m, NULL, NULL) + 2;
            }
            return push_captures(&m, start, end);
        }
        if (anchored || start >= m.subject_end) break;
        start++;
    }
    luaL_pushfail(L);
    return 1;
}

static int bounded_find(lua_State *L) { return find_or_match(L, 1); }
static int bounded_match(lua_State *L) { return find_or_match(L, 0); }

typedef struct gmatch_state {
    size_t position;
    size_t last_match;
    int has_last_match;
} gmatch_state;

static int gmatch_next(lua_State *L) {
    size_t subject_length, pattern_length;
    const char *s = lua_tolstring(L, lua_upvalueindex(1), &subject_length);
    const char *p = lua_tolstring(L, lua_upvalueindex(2), &pattern_length);
    gmatch_state *state = (gmatch_state *)lua_touserdata(L, lua_upvalueindex(3));
    matcher m;
    prepare(&m, L, s, subject_length, p, pattern_length, "pattern too expensive in string.gmatch");
    int first = required_first_byte(p, m.pattern_end);
    for (size_t position = state->position; position <= subject_length; position++) {
        const char *candidate = next_candidate(&m, s + position, first);
        if (candidate == NULL) break;
        position = (size_t)(candidate - s);
        m.level = 0;
        m.depth = MAX_DEPTH;
        const char *end = do_match(&m, s + position, p);
        // An empty match right where the previous one ended would repeat forever.
        if (end != NULL && !(state->has_last_match && (size_t)(end - s) == state->last_match)) {
            state->position = state->last_match = (size_t)(end - s);
            state->has_last_match = 1;
            return push_captures(&m, s + position, end);
        }
    }
    state->position = subject_length + 1;
    return 0;
}

static int bounded_gmatch(lua_State *L) {
    size_t subject_length;
    luaL_checklstring(L, 1, &subject_length);
    luaL_checkstring(L, 2);
    size_t init = start_position(luaL_optinteger(L, 3, 1), subject_length) - 1;
    if (init > subject_length) init = subject_length + 1;
    lua_settop(L, 2);
    gmatch_state *state = (gmatch_state *)lua_newuserdatauv(L, sizeof(gmatch_state), 0);
    state->position = init;
    state->last_match = 0;
    state->has_last_match = 0;
    lua_pushcclosure(L, gmatch_next, 3);
    return 1;
}

/// A replacement string: `%0`..`%9` for captures, `%%` for a percent sign.
static void add_replacement_string(matcher *m, luaL_Buffer *buffer, const char *s, const char *e) {
    lua_State *L = m->L;
    size_t length;
    const char *text = lua_tolstring(L, 3, &length);
    const char *end = text + length;
    const char *percent;
    while ((percent = (const char *)memchr(text, '%', (size_t)(end - text))) != NULL) {
        luaL_addlstring(buffer, text, (size_t)(percent - text));
        percent++;
        if (percent >= end) {
            luaL_error(L, "invalid use of '%c' in replacement string", '%');
        } else if (*percent == '%') {
            luaL_addchar(buffer, '%');
        } else if (*percent == '0') {
            luaL_addlstring(buffer, s, (size_t)(e - s));
        } else if (isdigit((unsigned char)*percent)) {
            push_capture(m, *percent - '1', s, e);
            luaL_tolstring(L, -1, NULL);
            lua_remove(L, -2);
            luaL_addvalue(buffer);
        } else {
            luaL_error(L, "invalid use of '%c' in replacement string", '%');
        }
        text = percent + 1;
    }
    luaL_addlstring(buffer, text, (size_t)(end - text));
}

/// Adds the replacement for the match `s`..`e`; returns whether anything was replaced.
static int add_replacement(matcher *m, luaL_Buffer *buffer, const char *s, const char *e, int type) {
    lua_State *L = m->L;
    switch (type) {
    case LUA_TFUNCTION: {
        lua_pushvalue(L, 3);
        int count = push_captures(m, s, e);
        lua_call(L, count, 1);
        break;
    }
    case LUA_TTABLE:
        push_capture(m, 0, s, e);
        lua_gettable(L, 3);
        break;
    default:
        add_replacement_string(m, buffer, s, e);
        return 1;
    }
    if (!lua_toboolean(L, -1)) {
        lua_pop(L, 1);
        luaL_addlstring(buffer, s, (size_t)(e - s));
        return 0;
    }
    if (!lua_isstring(L, -1)) return luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
    luaL_addvalue(buffer);
    return 1;
}

static int bounded_gsub(lua_State *L) {
    size_t subject_length, pattern_length;
    const char *s = luaL_checklstring(L, 1, &subject_length);
    const char *p = luaL_checklstring(L, 2, &pattern_length);
    int type = lua_type(L, 3);
    lua_Integer limit = luaL_optinteger(L, 4, (lua_Integer)subject_length + 1);
    luaL_argexpected(L, type == LUA_TNUMBER || type == LUA_TSTRING || type == LUA_TFUNCTION || type == LUA_TTABLE, 3,
                     "string/function/table");
    int anchored = pattern_length > 0 && *p == '^';
    if (anchored) {
        p++;
        pattern_length--;
    }
    luaL_Buffer buffer;
    luaL_buffinit(L, &buffer);
    matcher m;
    prepare(&m, L, s, subject_length, p, pattern_length, "pattern too expensive in string.gsub");
    const char *position = s;
    const char *last_match = NULL;
    lua_Integer count = 0;
    int changed = 0;
    int first = anchored ? -1 : required_first_byte(p, m.pattern_end);
    while (count < limit) {
        const char *candidate = next_candidate(&m, position, first);
        if (candidate == NULL) break;
        luaL_addlstring(&buffer, position, (size_t)(candidate - position));
        position = candidate;
        m.level = 0;
        m.depth = MAX_DEPTH;
        const char *end = do_match(&m, position, p);
        if (end != NULL && end != last_match) {
            count++;
            changed = add_replacement(&m, &buffer, position, end, type) | changed;
            position = last_match = end;
        } else if (position < m.subject_end) {
            luaL_addchar(&buffer, *position++);
        } else {
            break;
        }
        if (anchored) break;
    }
    if (!changed) {
        lua_pushvalue(L, 1);
    } else {
        luaL_addlstring(&buffer, position, (size_t)(m.subject_end - position));
        luaL_pushresult(&buffer);
    }
    lua_pushinteger(L, count);
    return 2;
}

void starling_lua_install_patterns(lua_State *L, int index) {
    static const luaL_Reg functions[] = {
        {"find", bounded_find},
        {"match", bounded_match},
        {"gmatch", bounded_gmatch},
        {"gsub", bounded_gsub},
        {NULL, NULL},
    };
    index = lua_absindex(L, index);
    for (const luaL_Reg *function = functions; function->name; function++) {
        lua_pushcfunction(L, function->func);
        lua_setfield(L, index, function->name);
    }
}
