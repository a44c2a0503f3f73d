-- Only accounts of these domains may create rooms (everyone may still join existing ones).
local creators = { ["localhost"] = true }

starling.hook("muc-create", function(event)
  local domain = event.actor:match("@([^/]+)")
  if not creators[domain] then
    return "error", "not-allowed", "rooms here are created by accounts of this server's own domain"
  end
end)
