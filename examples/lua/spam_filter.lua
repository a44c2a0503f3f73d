-- Keyword spam filter: a chat message from a local user whose body contains a listed word is refused
-- with <policy-violation/>, and the sender learns why. Words are matched case-insensitively as plain
-- text (no patterns), so a body cannot make the match slow.
local words = { "viagra", "casino bonus", "crypto giveaway" }

starling.hook("message-in", 100, function(stanza)
  local body = stanza.body
  if not body then return "pass" end
  body = body:lower()
  for _, word in ipairs(words) do
    if body:find(word, 1, true) then
      starling.log("info", "refused spam from " .. tostring(stanza.attr.from))
      return "error", "policy-violation", "message refused by the spam filter"
    end
  end
  return "pass"
end)
