-- wrk script for `make bench` (bench/run.py). Run with one thread (-t1).
--
--   wrk -t1 -c16 -d10s -s bench/wrk.lua URL -- [TOKENS [OFFSET [STOP_AFTER [MAX_TOKENS]]]]
--
-- TOKENS      a file with one token per line (or "-" for none). When given,
--             request i carries `Authorization: Bearer <token i>`, cycling
--             through the file from line OFFSET+1, so no token repeats until
--             the file wraps. All requests are formatted in init(), before
--             wrk's clock starts, so request() costs one table lookup.
--             Without it, requests are wrk's static request (-H headers).
-- STOP_AFTER  after that many responses, print `BENCH_STOP` and stop sending
--             (0: run for -d). wrk still sleeps out -d, so run.py answers
--             `BENCH_STOP` with SIGINT, on which wrk reports and exits.
-- MAX_TOKENS  read at most that many lines (0: all).
--
-- done() prints one line `BENCH_JSON {...}` (latencies in microseconds) that
-- run.py reads; wrk's own report (--latency) is printed before it.

local reqs, n, i = nil, 0, 0
local stop_after, seen = 0, 0

function init(args)
   local path = args[1]
   local offset = tonumber(args[2] or "0") or 0
   stop_after = tonumber(args[3] or "0") or 0
   local max_tokens = tonumber(args[4] or "0") or 0
   if path and path ~= "" and path ~= "-" then
      reqs = {}
      for line in io.lines(path) do
         if #line > 0 then
            n = n + 1
            reqs[n] = wrk.format("GET", wrk.path, { ["Authorization"] = "Bearer " .. line })
            if max_tokens > 0 and n >= max_tokens then break end
         end
      end
      if n == 0 then error("no tokens in " .. path) end
      i = offset % n
      request = function()
         i = i % n + 1
         return reqs[i]
      end
   end
   if stop_after > 0 then
      response = function(status, headers, body)
         seen = seen + 1
         if seen == stop_after then
            -- wrk itself would sleep out -d: tell run.py, which sends SIGINT
            -- (wrk then reports as usual).
            io.write("BENCH_STOP\n")
            io.flush()
            wrk.thread:stop()
         end
      end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
