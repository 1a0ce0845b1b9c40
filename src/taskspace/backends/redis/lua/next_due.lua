-- ARGV: queues. '0' if a task is claimable now, else seconds until the next
-- delayed task falls due (as a string), or '-1' if none is delayed.
local now = clock()
promote(now)
for _, q in ipairs(ARGV) do
  if redis.call('ZCARD', P .. 'ready:' .. q) > 0 then return '0' end
end
local first = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')
if #first == 0 then return '-1' end
return fmt(math.max(tonumber(first[2]) - now, 0.001))
