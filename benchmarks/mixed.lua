-- wrk script for mixed traffic: every MIXED_EVERY-th request (default 10) is a JSON POST of
-- MIXED_JSON_BYTES bytes (a valid JSON document; default 1024), the others octet-stream POSTs
-- of MIXED_BODY_BYTES bytes (default 1048576).
--
--   wrk -t2 -c50 -d10s -s benchmarks/mixed.lua http://127.0.0.1:18080/
--
-- At the end it prints one line "WRK_RESULT {json}", as post.lua does.

local json_size = tonumber(os.getenv("MIXED_JSON_BYTES") or "1024")
local size = tonumber(os.getenv("MIXED_BODY_BYTES") or "1048576")
local every = tonumber(os.getenv("MIXED_EVERY") or "10")
local counter = 0

-- {"data":"xxx...x"} padded to exactly `json_size` bytes.
local json_body = '{"data":"' .. string.rep("x", json_size - 11) .. '"}'
local other_body = string.rep("y", size)

function request()
  counter = counter + 1
  if counter % every == 0 then
    return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, json_body)
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/octet-stream"}, other_body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
