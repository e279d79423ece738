-- wrk script for bench/run.sh.
--
-- With BENCH_BODY_FILE set, every request is a POST of that file as JSON (the Mailkit case);
-- otherwise wrk's own GET. done() prints one machine-readable line that bench.py parses,
-- including p99.9, which wrk's --latency table does not show. All latencies in microseconds.

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d "
      .. "p50=%.0f p75=%.0f p90=%.0f p99=%.0f p999=%.0f max=%.0f mean=%.1f\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
