-- wrk script: every request is a POST of WRK_BODY_BYTES bytes (default 1024).
--
--   wrk -t2 -c50 -d10s -s benchmarks/post.lua http://127.0.0.1:18080/full-duplex-streamed
--
-- At the end it prints one line "WRK_RESULT {json}" that benchmarks/run.py reads. wrk counts
-- a response with status >= 400 as a status error; connect/read/write/timeout are socket errors.

local size = tonumber(os.getenv("WRK_BODY_BYTES") or "1024")

wrk.method = "POST"
wrk.body = string.rep("x", size)
wrk.headers["Content-Type"] = "application/octet-stream"
-- What `curl --compressed` sends (as the upload workload does): a compressing plugin compresses.
wrk.headers["Accept-Encoding"] = "deflate, gzip, br, zstd"

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
