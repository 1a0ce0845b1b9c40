-- Shared by every script (prepended at load time). KEYS[1] is the space's key
-- prefix, carrying a hash tag so that every key of a space lives in one slot.
--
-- Keys under the prefix: t:<id> (task hash), ready:<queue>\n<name> (claimable
-- tasks of one name, by score), qnames:<queue> (names that may have ready
-- tasks), delayed (by ready_at), running (by lease expiry), idx (every task,
-- by seq: submission order), expiry (finished tasks with a result_ttl, by reap
-- time; member state\nqueue\nid, so counts stay right even after the backstop
-- EXPIRE removed the hash), counts, wake:<queue>[\n<name>], claimreq and claimreqexp,
-- kv:<key>, kvidx (by key), kvexp (by expiry).
local P = KEYS[1]
local FIELDS = {'id', 'name', 'payload', 'codec', 'queue', 'priority', 'max_attempts', 'lease_s',
  'timeout', 'dedup_key', 'state', 'ready_at', 'attempts', 'lost', 'token', 'worker',
  'lease_expires', 'result', 'error', 'pdone', 'ptotal', 'cancel', 'created', 'started',
  'finished', 'result_ttl'}
local WAKE_MAX = 64
-- A settled task's hash expires this long after its reap time: a backstop for
-- a space nobody reaps. Reap still fixes counts and indexes from `expiry`.
local BACKSTOP_S = 3600

-- The store clock: the server's TIME, never a client's.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- The wall clock (Unix epoch seconds) for times a person reads.
local function wall()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- The next n fencing tokens of the space (one counter for task claims and
-- lease grants): strictly above every earlier one and never below the server's
-- wall clock in microseconds, so a counter that lost its last writes (a
-- failover to a replica that missed them, a wiped space) still restarts above
-- every token handed out before. Returns the first; the n are consecutive.
-- (taskspace.backends.base.next_token states the same rule.)
local function next_tokens(n)
  local t = redis.call('TIME')
  local wall_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('GET', P .. 'token') or '0')
  local first = math.max(last + 1, wall_us)
  redis.call('SET', P .. 'token', string.format('%d', first + n - 1))
  return first
end

-- Times as text with microseconds (Lua's tostring keeps only 14 digits).
local function fmt(x) return string.format('%.6f', x) end

local function tkey(id) return P .. 't:' .. id end

local function rkey(queue, name) return P .. 'ready:' .. queue .. '\n' .. name end

local function count(queue, state, delta)
  redis.call('HINCRBY', P .. 'counts', queue .. '\n' .. state, delta)
end

-- Higher priority first, then FIFO by submission sequence. Exact in a double
-- (Redis passes Lua numbers on as %.17g) for |priority| <= 2^20 and
-- seq < 2^32: |score| < 2^52 + 2^32 < 2^53. The API bounds priority to
-- base.PRIORITY_MIN..PRIORITY_MAX (+-1,000,000 < 2^20); a space has room
-- for 2^32 (4.29e9) submissions.
local function score(priority, seq)
  return -tonumber(priority) * 4294967296 + tonumber(seq)
end

-- ZADD of flat score, member pairs, in variadic calls of at most 1,000 pairs
-- (one call per batch rather than one per task).
local function zadd_pairs(key, flat)
  for i = 1, #flat, 2000 do
    redis.call('ZADD', key, unpack(flat, i, math.min(i + 1999, #flat)))
  end
end

-- Wake-up tokens for idle workers blocked in BLPOP, per queue and per
-- (queue, name); bounded, so stale tokens cost at most a few spurious wake-ups.
local function wake_list(key, n)
  local ones = {}
  for i = 1, math.min(n, WAKE_MAX) do ones[i] = '1' end
  -- RPUSH returns the new length: trim back to WAKE_MAX only past twice that,
  -- so an enqueue costs one call per list (a trim every WAKE_MAX enqueues at
  -- most) and a list never holds more than 2 * WAKE_MAX tokens.
  if redis.call('RPUSH', key, unpack(ones)) > 2 * WAKE_MAX then
    redis.call('LTRIM', key, -WAKE_MAX, -1)
  end
end

local function wake(woken)
  for queue, names in pairs(woken) do
    local total = 0
    for name, n in pairs(names) do
      wake_list(P .. 'wake:' .. queue .. '\n' .. name, n)
      total = total + n
    end
    wake_list(P .. 'wake:' .. queue, total)
  end
end

local function woke(woken, queue, name, n)
  local names = woken[queue] or {}
  woken[queue] = names
  names[name] = (names[name] or 0) + (n or 1)
end

local function make_ready(id, queue, name, priority, seq, woken)
  redis.call('ZADD', rkey(queue, name), score(priority, seq), id)
  redis.call('SADD', P .. 'qnames:' .. queue, name)
  woke(woken, queue, name)
end

local function enqueue(id, queue, name, priority, seq, ready_at, now, woken)
  if ready_at > now then
    redis.call('ZADD', P .. 'delayed', ready_at, id)
  else
    make_ready(id, queue, name, priority, seq, woken)
  end
end

local function promote(now)
  local due = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, 1000)
  local woken = {}
  for _, id in ipairs(due) do
    redis.call('ZREM', P .. 'delayed', id)
    local f = redis.call('HMGET', tkey(id), 'state', 'queue', 'priority', 'seq', 'name')
    if f[1] == 'queued' then make_ready(id, f[2], f[5], f[3], f[4], woken) end
  end
  wake(woken)
  return #due
end

local function expiry_member(state, queue, id) return state .. '\n' .. queue .. '\n' .. id end

-- A task reached a final state: free its dedup key, wake registered waiters,
-- schedule its deletion after result_ttl ('' or false: kept forever) by
-- adding its reap entry to `expiring` (flat score, member pairs), which the
-- caller writes with one zadd_pairs(P .. 'expiry', expiring) per script.
-- `waiters` is the task's 'waiters' field (see watch.lua), read by the
-- caller with the rest of the task, so an unwatched task costs no lookup.
local function settle(id, dedup_key, queue, state, now, result_ttl, expiring, waiters)
  if dedup_key then
    local dk = P .. 'dedup:' .. dedup_key
    if redis.call('GET', dk) == id then redis.call('DEL', dk) end
  end
  local n = tonumber(waiters or '0')
  if n > 0 then
    local dk = P .. 'done:' .. id
    for _ = 1, math.min(n, 16) do redis.call('RPUSH', dk, '1') end
    redis.call('EXPIRE', dk, 60)
    redis.call('HDEL', tkey(id), 'waiters')
  end
  if result_ttl and result_ttl ~= '' then
    local ttl = tonumber(result_ttl)
    expiring[#expiring + 1] = now + ttl
    expiring[#expiring + 1] = expiry_member(state, queue, id)
    redis.call('EXPIRE', tkey(id), math.ceil(ttl) + BACKSTOP_S)
  end
end

-- Remove a task from whichever claimable set holds it.
local function unready(id, queue, name)
  redis.call('ZREM', rkey(queue, name), id)
  redis.call('ZREM', P .. 'delayed', id)
end
