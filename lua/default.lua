-- errord's default policy, for an API that answers like the reference API
-- (JSON errors with a "message" field; request limits signalled with 403).
--
--   204        no new data: a success, passed through untouched
--   400 404 422  the client's mistake: logged, never retried
--   401        bad credentials: alert, never retried
--   403        "request limit ..." in the message: retried after Retry-After
--              (holding every request until then) or with backoff; any
--              other 403 is a real refusal: alert, pass it on
--   500 504    "try again later": retried with backoff
--   502        down or being upgraded: retried at once, then with a longer
--              backoff, and an alert once it keeps happening
--   (retries are for blips, not outages: an endpoint whose retries keep
--    failing is not retried for a while; see may_retry below)
--   TLS failed  certificate or handshake: alert, never retried
--   no answer  connection refused, timeout, reset: retried (errord itself
--              never repeats a POST or PATCH without an Idempotency-Key)
--
-- errord enforces the rest: attempts, the deadline, the retry budget,
-- idempotency, the size of a request body it can replay. Copy this file to
-- start your own policy.

local p = {}

p.settings = {
  attempts    = 3,                             -- the first try included
  backoff     = { base_ms = 100, max_ms = 5000 },
  deadline_ms = 15000,                         -- no retry that would end later
  budget      = { ratio = 0.2, min_per_s = 5 }, -- retries <= 20% of requests (+5/s)
}

local function message(res)
  local m = res.json and res.json.message
  return type(m) == "string" and m or ""
end

-- Retries are for blips, not outages. When nearly all retries of an
-- endpoint fail (the first retries of 3 requests or more, and over 80% of
-- them, in 10 s), retrying it only multiplies the load on a struggling
-- service and makes the application wait for an answer that will not
-- change. A retry's outcome is known only once it comes back, so until an
-- endpoint's earlier retries are seen to succeed (one in five at least), no
-- second sends more than 10 of its retries beyond those of the 9 s before:
-- one that starts failing every request gets a handful of retries, not one
-- per request, before the first ones fail. A retry that succeeds never
-- reaches a handler, so it shows as a retry that did not fail.
local function may_retry(req)
  local route = req.method .. " " .. req.path:match("^[^?]*")
  -- The counts are of each request's first retry, and whether it failed:
  -- this response is one that failed when it answers attempt 2. Each is
  -- read over 10 s and over this second.
  local failed = errord.count("failed retries " .. route, 10, req.attempt == 2 and 1 or 0)
  local failed_now = errord.count("failed retries " .. route, 1, 0)
  local retried = errord.count("retries " .. route, 10, 0)
  local retried_now = errord.count("retries " .. route, 1, 0)
  if req.attempt >= p.settings.attempts then
    return false -- errord would refuse it: not a retry made, so not counted
  end
  if failed >= 3 and failed > 0.8 * retried then
    return false
  end
  -- the retries of the 9 s before this second, whose outcomes are known
  local known, known_failed = retried - retried_now, failed - failed_now
  if retried_now >= 10 + known and known_failed >= 0.8 * known then
    return false
  end
  if req.attempt == 1 then
    errord.count("retries " .. route, 10)
  end
  return true
end

local function client_error(req, res)
  log { msg = "upstream rejected the request", path = req.path, message = message(res) }
end

p[400] = client_error
p[404] = client_error
p[422] = client_error

p[401] = function(req, res)
  alert { name = "UpstreamCredentialsRejected", severity = "critical",
          summary = "upstream answered 401 to " .. req.method .. " " .. req.path .. ": "
                    .. message(res) }
end

p[403] = function(req, res)
  if message(res):lower():find("limit", 1, true) then
    -- The upstream's request limit. When it says how long to wait, everyone
    -- waits: new requests are held by errord instead of being sent into the
    -- limit (a request that cannot wait that long gets 429 + Retry-After).
    if res.retry_after_ms then errord.cooldown(res.retry_after_ms) end
    if not may_retry(req) then return pass() end
    -- errord waits Retry-After when there is one, else our backoff
    return retry { reason = "request_limit" }
  end
  alert { name = "UpstreamForbidden", severity = "warning",
          summary = "upstream refused " .. req.method .. " " .. req.path .. ": " .. message(res) }
end

local function try_again(req, res)
  if not may_retry(req) then return pass() end
  return retry { reason = "server_error" }
end

p[500] = try_again
p[504] = try_again

p[502] = function(req, res)
  if errord.count("upstream_502", 60) > 10 then
    alert { name = "UpstreamDown", severity = "critical",
            summary = "over 10 responses 502 from the upstream in the last minute" }
  end
  if not may_retry(req) then return pass() end
  -- The first retry goes at once: behind the API a load balancer likely
  -- sends it to an instance that is up. Later ones back off, four times
  -- longer than for a 500.
  local after = req.attempt == 1 and 0 or errord.backoff(req.attempt + 2)
  return retry { after = after, reason = "upstream_down" }
end

p.error = function(req, err)
  if err.kind == "tls" then
    -- a certificate or handshake problem: a retry meets the same one
    alert { name = "UpstreamTLSFailed", severity = "critical",
            summary = "TLS with the upstream failed: " .. err.message }
    return pass()
  end
  return retry { reason = err.kind }
end

p.tests = {
  { name = "204 is a success",
    res = { status = 204 }, expect = { verdict = "pass", alert = false } },
  { name = "400 is logged, not retried",
    res = { status = 400, json = { message = "Invalid parameter: id" } },
    expect = { verdict = "pass", alert = false } },
  { name = "404 is not retried",
    res = { status = 404, json = { message = "Item not found" } }, expect = { verdict = "pass" } },
  { name = "422 is not retried",
    res = { status = 422, json = { message = "The JSON body of the request is badly-formed" } },
    expect = { verdict = "pass" } },
  { name = "401 raises a credentials alert",
    res = { status = 401, json = { message = "Missing or incorrect authentication credentials" } },
    expect = { verdict = "pass", alert = "UpstreamCredentialsRejected" } },
  { name = "403 for request limits is retried",
    res = { status = 403, json = { message = "Request limit exceeded, please slow down" } },
    expect = { verdict = "retry", reason = "request_limit", alert = false } },
  { name = "any other 403 alerts and passes",
    res = { status = 403, json = { message = "Access to this resource is not allowed" } },
    expect = { verdict = "pass", alert = "UpstreamForbidden" } },
  { name = "403 without a JSON body alerts and passes",
    res = { status = 403, body = "forbidden" },
    expect = { verdict = "pass", alert = "UpstreamForbidden" } },
  { name = "500 is retried",
    res = { status = 500, json = { message = "Something is broken" } },
    expect = { verdict = "retry", reason = "server_error" } },
  { name = "504 is retried",
    res = { status = 504 }, expect = { verdict = "retry", reason = "server_error" } },
  { name = "502 is retried",
    res = { status = 502 }, expect = { verdict = "retry", reason = "upstream_down" } },
  { name = "an endpoint whose retries nearly all fail is not retried",
    req = { method = "GET", path = "/v1/items?page=2" },
    counts = { ["retries GET /v1/items"] = 6, ["failed retries GET /v1/items"] = 6 },
    res = { status = 500 }, expect = { verdict = "pass" } },
  { name = "retries that often succeed go on",
    req = { method = "GET", path = "/v1/items" },
    counts = { ["retries GET /v1/items"] = { [10] = 20, [1] = 0 },
               ["failed retries GET /v1/items"] = { [10] = 10, [1] = 0 } },
    res = { status = 500 }, expect = { verdict = "retry" } },
  { name = "at most 10 retries a second for an endpoint not retried before",
    req = { method = "GET", path = "/v1/items" },
    counts = { ["retries GET /v1/items"] = 10 }, -- all of them this second
    res = { status = 500 }, expect = { verdict = "pass" } },
  { name = "retries that did not fail let more go out",
    req = { method = "GET", path = "/v1/items" },
    counts = { ["retries GET /v1/items"] = { [10] = 12, [1] = 11 } },
    res = { status = 500 }, expect = { verdict = "retry" } },
  { name = "a surge is held back while the earlier retries failed",
    req = { method = "GET", path = "/v1/items" },
    counts = { ["retries GET /v1/items"] = { [10] = 15, [1] = 13 },
               ["failed retries GET /v1/items"] = { [10] = 3, [1] = 0 } },
    res = { status = 500 }, expect = { verdict = "pass" } },
  { name = "retries in the seconds before let more go out",
    req = { method = "GET", path = "/v1/items" },
    counts = { ["retries GET /v1/items"] = { [10] = 40, [1] = 10 },
               ["failed retries GET /v1/items"] = { [10] = 20, [1] = 0 } },
    res = { status = 500 }, expect = { verdict = "retry" } },
  { name = "two failed retries do not stop retrying",
    req = { method = "GET", path = "/v1/items" },
    counts = { ["retries GET /v1/items"] = 2, ["failed retries GET /v1/items"] = 2 },
    res = { status = 504 }, expect = { verdict = "retry" } },
  { name = "the last attempt is passed on, not retried",
    attempt = 3, res = { status = 500 }, expect = { verdict = "pass" } },
  { name = "502 past 10 a minute alerts",
    counts = { upstream_502 = 10 },
    res = { status = 502 }, expect = { verdict = "retry", alert = "UpstreamDown" } },
  { name = "a refused connection is retried",
    err = { kind = "connect", message = "connection refused" },
    expect = { verdict = "retry", reason = "connect" } },
  { name = "a failed TLS handshake alerts and is not retried",
    err = { kind = "tls",
            message = "TLS handshake with the upstream failed: certificate has expired" },
    expect = { verdict = "pass", alert = "UpstreamTLSFailed" } },
}

return p
