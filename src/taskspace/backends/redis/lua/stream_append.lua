-- ARGV: stream maxlen('' = none) request_id('' = none) request_ttl data...
-- Appends every data item in order; returns {first id, count} (the ids are
-- consecutive). A repeated request id returns the first call's reply.
local stream, maxlen, request = ARGV[1], ARGV[2], ARGV[3]
local remembered = nil
if request ~= '' then remembered = request_recall('sreq', request, clock()) end
if remembered then return remembered end
local n = #ARGV - 4
local last = redis.call('INCRBY', P .. 'sid:' .. stream, n)
local first = last - n + 1
local key = stream_key(stream)
local t = fmt(wall())
for i = 1, n do
  redis.call('XADD', key, string.format('%d-0', first + i - 1), 'd', ARGV[4 + i], 't', t)
end
if maxlen ~= '' then redis.call('XTRIM', key, 'MAXLEN', '=', maxlen) end
local reply = {first, n}
if request ~= '' then request_remember('sreq', request, reply, clock(), ARGV[4]) end
return reply
