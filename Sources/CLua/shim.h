#ifndef STARLING_CLUA_SHIM_H
#define STARLING_CLUA_SHIM_H
// Lua 5.4's headers (Debian's liblua5.4-dev, found through pkg-config). Only the CLuaSandbox target
// includes them; Swift code goes through that target's API.
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>
#endif
