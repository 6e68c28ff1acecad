-- Pass every response through untouched, but raise an alert when the
-- upstream's server errors spike: more than 20 in the last 60 seconds.
-- The alert is de-duplicated by name and labels, so a long outage is one
-- alert with a growing count, not a flood.
local p = {}

p["5xx"] = function(req, res)
  local n = errord.count("upstream_5xx", 60)
  if n > 20 then
    alert { name = "Upstream5xxSpike", severity = "critical",
            summary = n .. " upstream 5xx responses in the last 60 s",
            labels = { status = tostring(res.status) } }
  end
  log { msg = "upstream server error", path = req.path, status_seen = res.status }
end

p.tests = {
  { name = "one 500 passes quietly", res = { status = 500 },
    expect = { verdict = "pass", alert = false } },
}

return p
