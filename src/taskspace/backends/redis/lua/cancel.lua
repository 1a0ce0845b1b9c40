-- ARGV: id terminate(0|1). Returns the state after the call, or nil for an
-- unknown task. A running task gets cancel=1 (cooperative) or 2 (terminate);
-- a later plain cancel never downgrades 2.
local id = ARGV[1]
local k = tkey(id)
local f = redis.call('HMGET', k, 'state', 'queue', 'dedup_key', 'name', 'result_ttl', 'cancel',
  'waiters')
if not f[1] then return false end
if f[1] == 'queued' then
  local now = clock()
  unready(id, f[2], f[4])
  redis.call('HSET', k, 'state', 'cancelled', 'finished', now)
  count(f[2], 'queued', -1)
  count(f[2], 'cancelled', 1)
  local expiring = {}
  settle(id, f[3], f[2], 'cancelled', now, f[5], expiring, f[7])
  zadd_pairs(P .. 'expiry', expiring)
  return 'cancelled'
end
if f[1] == 'running' then
  if ARGV[2] == '1' then redis.call('HSET', k, 'cancel', 2)
  elseif f[6] ~= '2' then redis.call('HSET', k, 'cancel', 1) end
end
return f[1]
