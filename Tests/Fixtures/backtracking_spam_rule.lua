-- Issue 19's spam rule, as an operator wrote it: on a long body of "buy now now now ..." without
-- "cheap", Lua's own matcher backtracks for tens of seconds. Both the sandbox's unit tests and the
-- end-to-end test load this file.
starling.hook("message-in", 100, function(stanza)
  local body = stanza.body
  if body and body:find("buy.-now.-cheap.-!") then return "error", "policy-violation", "spam" end
  return "pass"
end)
