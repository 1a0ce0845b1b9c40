-- Expired leases: back to the queue (lost + 1), or dead once attempts are spent.
local now = clock()
local ids = redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now, 'LIMIT', 0, 1000)
local handled = 0
local woken = {}
for _, id in ipairs(ids) do
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'state', 'lease_expires', 'attempts', 'max_attempts',
    'cancel', 'queue', 'priority', 'seq', 'dedup_key', 'worker', 'error')
  redis.call('ZREM', P .. 'running', id)
  if f[1] == 'running' and tonumber(f[2]) <= now then
    handled = handled + 1
    local attempts, max_attempts, q = tonumber(f[3]), tonumber(f[4]), f[6]
    local state
    if f[5] == '1' then state = 'cancelled'
    elseif attempts < max_attempts then state = 'queued'
    else state = 'dead' end
    local err = {type = 'WorkerLost', traceback = '', message = string.format(
      'lease expired on attempt %d of %d (worker %s); the worker died or stalled',
      attempts, max_attempts, f[10] or 'None')}
    if f[11] then err.previous = cjson.decode(f[11]) end
    redis.call('HSET', k, 'state', state, 'error', cjson.encode(err))
    redis.call('HINCRBY', k, 'lost', 1)
    redis.call('HDEL', k, 'lease_expires')
    count(q, 'running', -1)
    count(q, state, 1)
    if state == 'queued' then
      redis.call('HDEL', k, 'worker')
      redis.call('HSET', k, 'ready_at', now)
      enqueue(id, q, f[7], f[8], now, now, woken)
    else
      redis.call('HSET', k, 'finished', now)
      settle(id, f[9])
    end
  end
end
wake(woken)
return handled
