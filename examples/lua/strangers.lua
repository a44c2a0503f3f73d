-- Messages from strangers: a chat or normal message for a local account from someone who is not on
-- that account's roster is dropped before it reaches the account's sessions. Messages the server
-- sends itself (no localpart) and errors pass; so does everything while the roster is not known.
local function bare(jid)
  return (jid or ""):match("^[^/]*")
end

starling.hook("message-out", 100, function(stanza)
  local kind = stanza.attr.type or "normal"
  if kind ~= "chat" and kind ~= "normal" then return "pass" end
  local from, to = bare(stanza.attr.from), bare(stanza.attr.to)
  if from == to or not from:find("@", 1, true) then return "pass" end
  if starling.in_roster(to, from) == false then
    starling.log("debug", "dropped a message from stranger " .. from .. " to " .. to)
    return "drop"
  end
  return "pass"
end)
