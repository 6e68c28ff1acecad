-- The upstream signals request limits with 403 and a message; HTTP clients
-- (and their retry libraries) understand 429 with Retry-After. Turn one into
-- the other, so the application backs off by itself, and leave real 403s
-- alone.
local p = {}

p[403] = function(req, res)
  local msg = res.json and res.json.message or ""
  if type(msg) == "string" and msg:lower():find("limit", 1, true) then
    local wait_s = math.max(1, math.ceil((res.retry_after_ms or 1000) / 1000))
    return respond {
      status = 429,
      headers = { ["Retry-After"] = tostring(wait_s) },
      json = { message = msg },
    }
  end
end

p.tests = {
  { name = "request limit becomes 429",
    res = { status = 403, headers = { ["retry-after"] = "3" },
            json = { message = "Request limit exceeded, please slow down" } },
    expect = { verdict = "respond", status = 429 } },
  { name = "a real 403 stays",
    res = { status = 403, json = { message = "Access to this resource is not allowed" } },
    expect = { verdict = "pass" } },
}

return p
