-- The example policy of SPEC §2, verbatim: what the product contract shows a
-- user must load, pass its own tests and decide as its comments say
-- (tests/unit/test_policy.c).
local p = {}

p.settings = {                 -- all optional; reloaded with the policy
  attempts    = 3,             -- total tries per client request, the first included
  backoff     = { base_ms = 100, max_ms = 5000 },   -- exponential, full jitter
  deadline_ms = 15000,         -- no retry is started that would end after this
  budget      = { ratio = 0.2, min_per_s = 5 },     -- retries ≤ 20% of requests (+5/s)
  body_limit  = 65536,         -- response bodies up to this are buffered for handlers
  replay_limit = 1048576,      -- request bodies up to this are kept for retries
  alerts      = { { kind = "alertmanager", url = "http://127.0.0.1:9093" } },
}

p[403] = function(req, res)
  local msg = res.json and res.json.message or ""
  if msg:lower():find("limit") then                 -- the upstream's rate limiting
    return retry { after = res.retry_after_ms, reason = "rate_limited" }
  end
  alert { name = "UpstreamForbidden", severity = "warning",
          summary = "upstream refused " .. req.method .. " " .. req.path }
end

p["5xx"] = function(req, res)
  if errord.count("5xx", 60) > 20 then              -- 20 in the last 60 s
    alert { name = "Upstream5xxSpike", severity = "critical",
            summary = "over 20 upstream 5xx responses in 60 s" }
  end
  return retry { reason = "server_error" }
end

p.tests = {                    -- run by `errord check`, `errord test` and before every reload
  { name = "403 limit retries",
    res = { status = 403, body = '{"message":"request limit reached"}' },
    expect = { verdict = "retry" } },
}

return p
