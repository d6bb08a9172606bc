-- wrk script: POST one prebuilt body from a file, one session token per connection, and
-- latency/throughput counted only inside a measurement window (warm-up and measurement happen in
-- ONE wrk run, so the server never sees a gap or a burst of abandoned requests between them).
--
-- bench.run starts wrk with as many threads as connections (-t C -c C): every wrk thread owns
-- exactly one keep-alive connection and its own Lua state, so it gets its own session token
-- (setup() hands token i to thread i) and its own response timestamps. The request itself is
-- static (built once per thread in init), so wrk never calls Lua to build a request.
--
-- Latency of a response = time since the previous response on the same connection (or since the
-- thread started, for the first). With one connection per thread, no pipelining and no delay, wrk
-- writes the next request right after reading a response, so this equals wrk's own latency.
--
-- Environment:
--   BENCH_BODY_FILE     file holding the exact request body bytes
--   BENCH_CONTENT_TYPE  Content-Type header value
--   BENCH_PATH          request path, e.g. /v1/predict
--   BENCH_HEADERS       optional: extra request headers, "Name: value" one a line
--                       (e.g. Inference-Header-Content-Length for the Open Inference Protocol's binary form)
--   BENCH_TOKENS_FILE   optional: one bearer token per line; thread i uses line i (wrapping)
--   BENCH_WINDOW_START, BENCH_WINDOW_END  CLOCK_MONOTONIC seconds (Python's time.monotonic())

local ffi = require("ffi")
ffi.cdef [[
typedef struct bench_timespec { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec[1]")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts[0].tv_sec) + tonumber(ts[0].tv_nsec) * 1e-9
end

local tokens = {}
local threads = {}
local tokens_file = os.getenv("BENCH_TOKENS_FILE")
if tokens_file and tokens_file ~= "" then
  for line in io.lines(tokens_file) do
    if line ~= "" then tokens[#tokens + 1] = line end
  end
end
local window_start = tonumber(os.getenv("BENCH_WINDOW_START") or "0")
local window_end = tonumber(os.getenv("BENCH_WINDOW_END") or "1e300")

-- Main Lua state, once per thread, before that thread's init().
function setup(thread)
  threads[#threads + 1] = thread
  if #tokens > 0 then
    thread:set("token", tokens[((#threads - 1) % #tokens) + 1])
  end
end

-- Thread state from here on.
lat = {}      -- latencies (s) of responses inside the window
bad = 0       -- non-200 responses inside the window
late = 0      -- responses after the window (ignored)
local last = 0

function init(args)
  local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
  wrk.method = "POST"
  wrk.path = os.getenv("BENCH_PATH") or "/"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
  for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
    local name, value = line:match("^([^:]+):%s*(.*)$")
    if name then wrk.headers[name] = value end
  end
  if token then
    wrk.headers["Authorization"] = "Bearer " .. token
  end
  last = now()
end

function response(status, headers, body)
  local t = now()
  if t >= window_start and t <= window_end then
    if status == 200 then
      lat[#lat + 1] = t - last
    else
      bad = bad + 1
    end
  elseif t > window_end then
    late = late + 1
  end
  last = t
end

local function percentile(sorted, p)
  if #sorted == 0 then return -1 end
  local i = math.max(1, math.ceil(p / 100 * #sorted))
  return sorted[i]
end

function done(summary, latency, requests)
  local all, bad_total, late_total = {}, 0, 0
  for _, thread in ipairs(threads) do
    for _, x in ipairs(thread:get("lat")) do all[#all + 1] = x end
    bad_total = bad_total + thread:get("bad")
    late_total = late_total + thread:get("late")
  end
  table.sort(all)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"ok": %d, "bad_status": %d, "late": %d, "window_s": %.6f, ' ..
    '"p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, ' ..
    '"wrk_requests": %d, "wrk_errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"threads": %d}\n',
    #all, bad_total, late_total, window_end - window_start,
    percentile(all, 50) * 1000, percentile(all, 95) * 1000, percentile(all, 99) * 1000,
    (all[#all] or -0.001) * 1000,
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout, #threads))
end
