-- ARGV: id. A failed or dead task goes back to its queue with fresh attempts
-- (attempts = lost = 0, ready now, last error kept, progress reset). Returns
-- the state after the call, or nil for an unknown task.
local id = ARGV[1]
local k = tkey(id)
local f = redis.call('HMGET', k, 'state', 'queue', 'name', 'priority', 'seq', 'dedup_key')
if not f[1] then return false end
if f[1] ~= 'failed' and f[1] ~= 'dead' then return f[1] end
local now = clock()
local woken = {}
redis.call('ZREM', P .. 'expiry', expiry_member(f[1], f[2], id))
redis.call('PERSIST', k)
redis.call('HSET', k, 'state', 'queued', 'attempts', 0, 'lost', 0, 'ready_at', now)
redis.call('HDEL', k, 'finished', 'worker', 'lease_expires', 'cancel', 'pdone', 'ptotal',
  'result')
if f[6] and redis.call('SET', P .. 'dedup:' .. f[6], id, 'NX') == false then
  redis.call('HDEL', k, 'dedup_key')  -- another live task holds the key now
end
count(f[2], f[1], -1)
count(f[2], 'queued', 1)
make_ready(id, f[2], f[3], f[4], f[5], woken)
wake(woken)
return 'queued'
