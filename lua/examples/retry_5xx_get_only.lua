-- Retry server errors, but only for reads: a GET may be repeated, and this
-- policy does not want even idempotent writes (PUT, DELETE) sent twice.
local p = {}

p.settings = { attempts = 4, backoff = { base_ms = 50, max_ms = 2000 } }

p["5xx"] = function(req, res)
  if req.method == "GET" then
    return retry { reason = "server_error" }
  end
end

p.tests = {
  { name = "GET 503 retries", req = { method = "GET" }, res = { status = 503 },
    expect = { verdict = "retry" } },
  { name = "PUT 503 passes", req = { method = "PUT" }, res = { status = 503 },
    expect = { verdict = "pass" } },
  { name = "GET 404 untouched", req = { method = "GET" }, res = { status = 404 },
    expect = { verdict = "pass" } },
}

return p
