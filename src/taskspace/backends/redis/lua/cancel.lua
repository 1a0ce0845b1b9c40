-- ARGV: id. Returns the state after the call, or nil for an unknown task.
local id = ARGV[1]
local k = tkey(id)
local f = redis.call('HMGET', k, 'state', 'queue', 'dedup_key')
if not f[1] then return false end
if f[1] == 'queued' then
  redis.call('ZREM', P .. 'ready:' .. f[2], id)
  redis.call('ZREM', P .. 'delayed', id)
  redis.call('HSET', k, 'state', 'cancelled', 'finished', clock())
  count(f[2], 'queued', -1)
  count(f[2], 'cancelled', 1)
  settle(id, f[3])
  return 'cancelled'
end
if f[1] == 'running' then redis.call('HSET', k, 'cancel', 1) end
return f[1]
