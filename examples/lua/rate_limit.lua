-- Per-account message rate limit: at most `limit` messages per `window` seconds from each account
-- (all its resources together). The counter is shared by every thread the server runs hooks on.
local limit, window = 5, 10

local function bare(jid)
  return (jid or ""):match("^[^/]*")
end

starling.hook("message-in", 50, function(stanza)
  if stanza.attr.type == "error" then return "pass" end
  local count = starling.incr("messages:" .. bare(stanza.attr.from), window)
  if count > limit then
    return "error", "resource-constraint", "more than " .. limit .. " messages in " .. window .. " seconds"
  end
  return "pass"
end)
