-- ARGV: stream maxlen('' = none) request_id('' = none) request_ttl data...
-- Appends every data item in order; returns {first id (text), count} (the ids
-- are consecutive). A repeated request id returns the first call's reply.
local stream, maxlen, request = ARGV[1], ARGV[2], ARGV[3]
local remembered = nil
if request ~= '' then remembered = request_recall('sreq', request, clock()) end
if remembered then return remembered end
local n = #ARGV - 4
local first = stream_next_ids(stream, n)
local key = stream_key(stream)
local t = fmt(wall())
for i = 1, n do
  redis.call('XADD', key, string.format('%d-0', first + i - 1), 'd', ARGV[4 + i], 't', t)
end
if maxlen ~= '' then redis.call('XTRIM', key, 'MAXLEN', '=', maxlen) end
-- The first id as text: cjson (request_remember) keeps only 14 digits of a number.
local reply = {string.format('%d', first), n}
if request ~= '' then request_remember('sreq', request, reply, clock(), ARGV[4]) end
return reply
