-- wrk script for scripts/enqueue_bench.py: every request is the next prepared one (a distinct
-- upload, or the URL of a distinct job), with its own API key. Arguments:
--   wrk -tT ... -s requests.lua URL -- METHOD DATA_FILE INDEX_FILE T
-- DATA_FILE holds the bodies (POST) or nothing (GET); INDEX_FILE one line per request:
--   "offset length path key" (body = DATA_FILE[offset, offset+length)).
-- It prints one JSON line: requests, duration, errors and latency percentiles (microseconds).

local thread_counter = 0

function setup(thread)
  thread:set("id", thread_counter)
  thread_counter = thread_counter + 1
end

function init(args)
  method = args[1]
  local data = ""
  if method == "POST" then
    local f = assert(io.open(args[2], "rb"))
    data = f:read("*a")
    f:close()
  end
  items = {}
  for line in io.lines(args[3]) do
    local offset, length, path, key = line:match("^(%d+) (%d+) (%S+) (%S+)$")
    local body = nil
    if method == "POST" then
      body = data:sub(tonumber(offset) + 1, tonumber(offset) + tonumber(length))
    end
    table.insert(items, {path = path, key = key, body = body})
  end
  nthreads = tonumber(args[4])
  next_item = id
  boundary_header = "multipart/form-data; boundary=dmaebenchboundary"
end

function request()
  local item = items[(next_item % #items) + 1]
  next_item = next_item + nthreads
  local headers = {["X-API-Key"] = item.key}
  if method == "POST" then
    headers["Content-Type"] = boundary_header
  end
  return wrk.format(method, item.path, headers, item.body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "socket_errors": %d, "bad_status": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
