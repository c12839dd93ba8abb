-- Replays pre-signed deliveries for bench/webhooks.py. Each wrk thread sends its own
-- share of the list (request i goes to thread i mod threads), in order, wrapping
-- around if the list runs out, and counts answers by status.
--
-- Environment: WEBHOOK_REQUESTS, a file of records "<length>\n<raw HTTP request>";
-- WEBHOOK_THREADS, wrk's -t.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("index", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local file = assert(io.open(os.getenv("WEBHOOK_REQUESTS"), "rb"))
   local data = file:read("*a")
   file:close()
   local all, pos = {}, 1
   while pos <= #data do
      local eol = string.find(data, "\n", pos, true)
      local length = tonumber(string.sub(data, pos, eol - 1))
      table.insert(all, string.sub(data, eol + 1, eol + length))
      pos = eol + 1 + length
   end
   mine = {}
   for i = index + 1, #all, tonumber(os.getenv("WEBHOOK_THREADS") or "1") do
      table.insert(mine, all[i])
   end
   issued, wrapped, next_request = 0, 0, 1
   statuses = {}
end

function request()
   local raw = mine[next_request]
   next_request = next_request + 1
   if next_request > #mine then
      next_request, wrapped = 1, wrapped + 1
   end
   issued = issued + 1
   return raw
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local issued_all, wrapped_all, by_status = 0, 0, {}
   for _, thread in ipairs(threads) do
      issued_all = issued_all + thread:get("issued")
      wrapped_all = wrapped_all + thread:get("wrapped")
      for status, count in pairs(thread:get("statuses")) do
         by_status[status] = (by_status[status] or 0) + count
      end
   end
   local parts = {}
   for status, count in pairs(by_status) do
      table.insert(parts, string.format('"%d": %d', status, count))
   end
   io.write(string.format(
      'WRK_RESULT {"completed": %d, "issued": %d, "wrapped": %d, "duration_us": %d, ' ..
      '"errors": %d, "p50_us": %d, "p99_us": %d, "statuses": {%s}}\n',
      summary.requests, issued_all, wrapped_all, summary.duration,
      summary.errors.connect + summary.errors.read + summary.errors.write +
      summary.errors.timeout, latency:percentile(50), latency:percentile(99),
      table.concat(parts, ", ")))
end
