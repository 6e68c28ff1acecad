-- luacheck for errord policies: what the sandbox offers and nothing else, so
-- a policy that reaches for io, require or os.getenv is told at once.
--   luacheck --config /usr/local/share/errord/luacheckrc my-policy.lua
-- (`make test` runs it on lua/default.lua and lua/examples.)
std = "errord"

stds.errord = {
  read_globals = {
    -- Lua 5.4's base library, less dofile, loadfile and collectgarbage
    "_G", "_VERSION", "assert", "error", "getmetatable", "ipairs", "load", "next",
    "pairs", "pcall", "print", "rawequal", "rawget", "rawlen", "rawset", "select",
    "setmetatable", "tonumber", "tostring", "type", "warn", "xpcall",
    string = { fields = {
      "byte", "char", "find", "format", "gmatch", "gsub", "len", "lower", "match",
      "pack", "packsize", "rep", "reverse", "sub", "unpack", "upper",
    } },
    table = { fields = { "concat", "insert", "move", "pack", "remove", "sort", "unpack" } },
    math = { fields = {
      "abs", "ceil", "cos", "deg", "exp", "floor", "fmod", "huge", "log", "max",
      "maxinteger", "min", "mininteger", "modf", "pi", "rad", "random", "randomseed",
      "sin", "sqrt", "tan", "tointeger", "type", "ult", "acos", "asin", "atan",
      -- Debian's Lua 5.4 keeps 5.2's (LUA_COMPAT_MATHLIB)
      "atan2", "cosh", "frexp", "ldexp", "log10", "pow", "sinh", "tanh",
    } },
    utf8 = { fields = { "char", "charpattern", "codepoint", "codes", "len", "offset" } },
    -- os has only its clock and calendar functions
    os = { fields = { "clock", "date", "difftime", "time" } },
    -- errord's verdicts and side effects
    "pass", "retry", "respond", "log", "alert",
    errord = { fields = {
      "backoff", "cooldown", "count", "now_ms",
      json = { fields = { "decode", "encode" } },
    } },
  },
}

-- A handler is called as handler(req, res): an unused argument is normal.
unused_args = false
max_line_length = 100
