-- Shared by every script (prepended at load time). KEYS[1] is the space's key
-- prefix, carrying a hash tag so that every key of a space lives in one slot.
local P = KEYS[1]
local FIELDS = {'id', 'name', 'payload', 'codec', 'queue', 'priority', 'max_attempts', 'lease_s',
  'timeout', 'dedup_key', 'state', 'ready_at', 'attempts', 'lost', 'token', 'worker',
  'lease_expires', 'result', 'error', 'pdone', 'ptotal', 'cancel', 'created', 'started',
  'finished'}
local WAKE_MAX = 64

-- The store clock: the server's TIME, never a client's.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Times as text with microseconds (Lua's tostring keeps only 14 digits).
local function fmt(x) return string.format('%.6f', x) end

local function tkey(id) return P .. 't:' .. id end

local function count(queue, state, delta)
  redis.call('HINCRBY', P .. 'counts', queue .. '\n' .. state, delta)
end

-- Higher priority first, then FIFO by submission sequence; exact in a double
-- while |priority| < 2^20 and seq < 2^32.
local function score(priority, seq)
  return -tonumber(priority) * 4294967296 + tonumber(seq)
end

-- Wake-up tokens for idle workers blocked in BLPOP; bounded, so stale tokens
-- cost at most a few spurious wake-ups.
local function wake(woken)
  for queue, n in pairs(woken) do
    local key = P .. 'wake:' .. queue
    for _ = 1, math.min(n, WAKE_MAX) do redis.call('RPUSH', key, '1') end
    redis.call('LTRIM', key, -WAKE_MAX, -1)
  end
end

local function enqueue(id, queue, priority, seq, ready_at, now, woken)
  if ready_at > now then
    redis.call('ZADD', P .. 'delayed', ready_at, id)
  else
    redis.call('ZADD', P .. 'ready:' .. queue, score(priority, seq), id)
    woken[queue] = (woken[queue] or 0) + 1
  end
end

local function promote(now)
  local due = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, 1000)
  local woken = {}
  for _, id in ipairs(due) do
    redis.call('ZREM', P .. 'delayed', id)
    local f = redis.call('HMGET', tkey(id), 'state', 'queue', 'priority', 'seq')
    if f[1] == 'queued' then
      redis.call('ZADD', P .. 'ready:' .. f[2], score(f[3], f[4]), id)
      woken[f[2]] = (woken[f[2]] or 0) + 1
    end
  end
  wake(woken)
  return #due
end

-- A task reached a final state: free its dedup key, wake registered waiters.
local function settle(id, dedup_key)
  if dedup_key then
    local dk = P .. 'dedup:' .. dedup_key
    if redis.call('GET', dk) == id then redis.call('DEL', dk) end
  end
  local wk = P .. 'waiting:' .. id
  local n = tonumber(redis.call('GET', wk) or '0')
  if n > 0 then
    local dk = P .. 'done:' .. id
    for _ = 1, math.min(n, 16) do redis.call('RPUSH', dk, '1') end
    redis.call('EXPIRE', dk, 60)
    redis.call('DEL', wk)
  end
end
