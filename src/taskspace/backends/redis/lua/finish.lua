-- ARGV: 7 fields per item: id token kind has_result result error delay.
-- Returns 1 (accepted) or 0 (stale, counted) per item.
local now = clock()
local out = {}
local stale = 0
local woken = {}
for i = 1, #ARGV, 7 do
  local id, token, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'state', 'token', 'attempts', 'max_attempts', 'cancel',
    'queue', 'priority', 'seq', 'dedup_key')
  if f[1] ~= 'running' or f[2] ~= token then
    stale = stale + 1
    out[#out + 1] = 0
  else
    local attempts, max_attempts = tonumber(f[3]), tonumber(f[4])
    local state
    if kind == 'succeeded' or kind == 'failed' or kind == 'cancelled' then state = kind
    elseif f[5] == '1' then state = 'cancelled'
    elseif kind == 'release' then state = 'queued'
    elseif attempts < max_attempts then state = 'queued'
    else state = 'failed' end
    local q = f[6]
    redis.call('ZREM', P .. 'running', id)
    redis.call('HDEL', k, 'lease_expires')
    if ARGV[i + 5] ~= '' then redis.call('HSET', k, 'error', ARGV[i + 5]) end
    count(q, 'running', -1)
    count(q, state, 1)
    if state == 'queued' then
      if kind == 'release' then redis.call('HSET', k, 'attempts', attempts - 1) end
      local ready_at = now + tonumber(ARGV[i + 6])
      redis.call('HSET', k, 'state', 'queued', 'ready_at', ready_at)
      redis.call('HDEL', k, 'worker')
      enqueue(id, q, f[7], f[8], ready_at, now, woken)
    else
      redis.call('HSET', k, 'state', state, 'finished', now)
      if ARGV[i + 3] == '1' then redis.call('HSET', k, 'result', ARGV[i + 4]) end
      settle(id, f[9])
    end
    out[#out + 1] = 1
  end
end
if stale > 0 then redis.call('INCRBY', P .. 'stale', stale) end
wake(woken)
return out
