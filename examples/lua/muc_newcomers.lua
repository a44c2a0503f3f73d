-- Newcomers are visitors for their first seconds in a room: they may read but not speak. The first
-- message they send after that gives them voice (everyone sees the role change) and goes through.
-- Owners, admins and members are not held back.
local wait = 30

local function key(event)
  return "joined:" .. event.room.jid .. ":" .. event.occupant.jid:match("^[^/]+")
end

starling.hook("muc-join", function(event)
  if event.occupant.affiliation == "none" and event.occupant.role == "participant" then
    starling.set(key(event), starling.now(), wait * 10)
    event.occupant.role = "visitor"
    return "modify"
  end
end)

starling.hook("muc-message", function(event)
  local joined = starling.get(key(event))
  if not joined or event.occupant.role ~= "visitor" then return end
  local left = wait - (starling.now() - joined)
  if left > 0 then
    return "error", "forbidden", string.format("new here: you may speak in %d seconds", math.ceil(left))
  end
  starling.set(key(event), nil)
  event.occupant.role = "participant"
  return "modify"
end)
