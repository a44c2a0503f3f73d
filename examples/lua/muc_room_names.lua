-- Room names must be lowercase letters, digits and dashes, 3 to 32 of them.
starling.hook("muc-create", function(event)
  local name = event.room.jid:match("^([^@]+)@")
  if not name or #name < 3 or #name > 32 or not name:match("^[a-z0-9%-]+$") then
    return "error", "not-acceptable", "room names are 3 to 32 lowercase letters, digits and dashes"
  end
end)
