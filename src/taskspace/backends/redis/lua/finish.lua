-- ARGV: 7 fields per item: id token kind has_result result error delay.
-- Returns 1 (accepted) or 0 (stale, counted) per item.
local now = clock()
local out = {}
local stale = 0
local woken = {}
local counts = {}
local ended = {}
local expiring = {}
for i = 1, #ARGV, 7 do
  local id, token, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'state', 'token', 'attempts', 'max_attempts', 'cancel',
    'queue', 'priority', 'seq', 'dedup_key', 'name', 'result_ttl', 'waiters')
  if f[1] ~= 'running' or f[2] ~= token then
    stale = stale + 1
    out[#out + 1] = 0
  else
    local attempts, max_attempts = tonumber(f[3]), tonumber(f[4])
    local state
    if kind == 'succeeded' or kind == 'failed' or kind == 'cancelled' then state = kind
    elseif f[5] then state = 'cancelled'
    elseif kind == 'release' then state = 'queued'
    elseif attempts < max_attempts then state = 'queued'
    else state = 'failed' end
    local q = f[6]
    ended[#ended + 1] = id
    local c = counts[q] or {}
    counts[q] = c
    c.running = (c.running or 0) - 1
    c[state] = (c[state] or 0) + 1
    local set = {'state', state}
    if ARGV[i + 5] ~= '' then set[#set + 1] = 'error'; set[#set + 1] = ARGV[i + 5] end
    if state == 'queued' then
      if kind == 'release' then
        set[#set + 1] = 'attempts'; set[#set + 1] = attempts - 1
        redis.call('HDEL', k, 'pdone', 'ptotal')  -- a released task starts afresh
      end
      local ready_at = now + tonumber(ARGV[i + 6])
      set[#set + 1] = 'ready_at'
      set[#set + 1] = ready_at
      redis.call('HSET', k, unpack(set))
      redis.call('HDEL', k, 'worker', 'lease_expires')
      enqueue(id, q, f[10], f[7], f[8], ready_at, now, woken)
    else
      set[#set + 1] = 'finished'
      set[#set + 1] = now
      if ARGV[i + 3] == '1' then set[#set + 1] = 'result'; set[#set + 1] = ARGV[i + 4] end
      redis.call('HSET', k, unpack(set))
      redis.call('HDEL', k, 'lease_expires')
      settle(id, f[9], q, state, now, f[11], expiring, f[12])
    end
    out[#out + 1] = 1
  end
end
for i = 1, #ended, 4000 do
  redis.call('ZREM', P .. 'running', unpack(ended, i, math.min(i + 3999, #ended)))
end
for q, c in pairs(counts) do
  for state, delta in pairs(c) do count(q, state, delta) end
end
zadd_pairs(P .. 'expiry', expiring)
if stale > 0 then redis.call('INCRBY', P .. 'stale', stale) end
wake(woken)
return out
