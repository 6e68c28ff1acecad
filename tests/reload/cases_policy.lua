-- A policy for the case files next to it (tests/integration/test_tools.py):
-- each handler looks at a different part of what a case can set.
local p = {}

p.settings = { attempts = 3, backoff = { base_ms = 1, max_ms = 5 } }

-- the request's method and attempt
p[503] = function(req, res)
  if req.method ~= "GET" then return pass() end
  if req.attempt >= 3 then
    return respond { status = 503, json = { message = "gave up after " .. req.attempt } }
  end
  return retry { reason = "unavailable" }
end

-- the response's headers
p[429] = function(req, res)
  if res.headers["retry-after"] then return retry { reason = "told_to_wait" } end
  return respond { status = 503, json = { message = "slow down" } }
end

-- the request's headers, the response's JSON body, alerts
p[403] = function(req, res)
  if req.headers["x-tenant"] == "vip" then return retry { reason = "vip" } end
  local m = res.json and res.json.message or ""
  if m:lower():find("limit", 1, true) then
    return respond { status = 429, headers = { ["retry-after"] = "1" } }
  end
  alert { name = "Forbidden", severity = "warning", summary = "403 for " .. req.path }
end

-- the request's path, a raw body
p[404] = function(req, res)
  if req.path:find("^/v2/") and res.body == "gone" then
    return respond { status = 410 }
  end
end

-- count windows
p[500] = function(req, res)
  if errord.count("500s", 60) > 5 then
    alert { name = "Many500", severity = "critical", summary = "over 5 upstream 500s in 60 s" }
    return pass()
  end
  return retry { reason = "server_error" }
end

-- failures with no status
p.error = function(req, err)
  if err.kind == "timeout" then
    return respond { status = 504, json = { message = err.message } }
  end
  return retry { reason = err.kind }
end

return p
