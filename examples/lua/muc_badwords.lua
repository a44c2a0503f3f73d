-- A bad-words filter per room: a message with a listed word is refused; the third one within an hour
-- gets its sender kicked. Rooms not listed use the "*" list.
local words = {
  ["*"] = { "darn", "heck" },
  ["pirates@conference.localhost"] = { "landlubber" },
}
local strikes_allowed = 3

starling.hook("muc-message", function(event)
  local list = words[event.room.jid] or words["*"]
  local body = event.body and event.body:lower()
  if not list or not body then return end
  for _, word in ipairs(list) do
    if body:find(word, 1, true) then
      local user = event.occupant.jid:match("^[^/]+")
      local strikes = starling.incr("strikes:" .. event.room.jid .. ":" .. user, 3600)
      if strikes >= strikes_allowed then return "kick", "repeated bad language" end
      return "error", "policy-violation", "mind your language (" .. strikes .. " of " .. strikes_allowed .. ")"
    end
  end
end)
