-- Shared by every script (prepended at load time, after the task state rules
-- generated from outcomes.py and the task field list generated from
-- records.FIELDS: FIELDS, and FIELD mapping each name to its index). KEYS[1] is
-- the space's key prefix, carrying a hash tag so that every key of a space
-- lives in one slot.
--
-- Keys under the prefix: space (the space id), clock (the lease clock's
-- high-water mark and offset), token (fencing tokens), seq (submission
-- order), t:<id> (task hash), ready:<queue>\n<name> (claimable tasks of one
-- name, by score), qnames:<queue> (names that may have ready tasks), delayed
-- (by ready_at), running (by lease expiry), idx (every task, by seq:
-- submission order), expiry (finished tasks with a result_ttl, by reap time;
-- member state\nqueue\nid, so counts stay right even after the backstop
-- EXPIRE removed the hash), counts, stale, dedup:<key>, done:<id>,
-- wake:<queue>[\n<name>] (expire WAKE_TTL_S after their last token),
-- claimreq and claimreqexp (request ids of claims, lua/_request.lua).
-- Set per call, from KEYS[1], by the function that runs each script (conn.py).
local P = nil
local WAKE_MAX = 64
-- A settled task's hash expires this long after its reap time: a backstop for
-- a space nobody reaps. Reap still fixes counts and indexes from `expiry`.
local BACKSTOP_S = 3600
-- Redis expiries (EXPIRE/PEXPIRE arguments) are clamped to this many
-- milliseconds (about 317 years, past base.MAX_DURATION_S), so that no
-- duration a caller got through can make an EXPIRE fail halfway through a
-- script; scripts compute their expiries before their first write.
local MAX_EXPIRE_MS = 10000000000000
-- A wake list expires this long after its last token (tokens are only hints).
local WAKE_TTL_S = 60

-- Times as text with microseconds (Lua's tostring keeps only 14 digits).
local function fmt(x) return string.format('%.6f', x) end

-- `seconds` as a PEXPIRE argument: whole milliseconds, rounded up, from 1 to
-- MAX_EXPIRE_MS.
local function expire_ms(seconds)
  return math.min(math.max(math.ceil(seconds * 1000), 1), MAX_EXPIRE_MS)
end

-- The server's TIME as Unix epoch seconds.
local function server_time()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- The wall clock (Unix epoch seconds) for times a person reads.
local function wall() return server_time() end

-- The lease clock: TIME plus the space's offset (0 until the server's clock
-- ever stepped back), kept from going backwards by a high-water mark: the hash
-- P..'clock' keeps `mark`, above every time returned so far, rewritten at most
-- once per CLOCK_REFRESH_S (a script pays one HMGET, not a write): while the
-- clock runs normally it lies in [mark - CLOCK_REFRESH_S, mark]. A clock below
-- that window stepped back: the offset grows so that the clock resumes at the
-- mark (at most CLOCK_REFRESH_S past the last time handed out, so a lease may
-- end that much early once). A step back smaller than the clock's position in
-- the window (so below CLOCK_REFRESH_S) can go unnoticed. The mark lives in
-- the space, so it survives restarts with persistence and follows failovers.
-- Computed once per script run.
local CLOCK_REFRESH_S = 1.0
local clock_memo = nil  -- reset per call, with P
local function clock()
  if clock_memo then return clock_memo end
  local time = server_time()
  local key = P .. 'clock'
  local h = redis.call('HMGET', key, 'mark', 'offset')
  local mark, offset = tonumber(h[1]), tonumber(h[2]) or 0
  local now = time + offset
  if mark and now < mark - CLOCK_REFRESH_S then
    now = mark
    redis.call('HSET', key, 'mark', fmt(now + CLOCK_REFRESH_S), 'offset', fmt(now - time))
  elseif not mark or now > mark then
    redis.call('HSET', key, 'mark', fmt(now + CLOCK_REFRESH_S))
  end
  clock_memo = now
  return now
end

-- The first of the next n values of the counter at key `counter` (the n are
-- consecutive): strictly above every earlier one and never below the server's
-- wall clock in microseconds, so a counter that lost its last writes (a
-- failover to a replica that missed them, a wiped space) still restarts above
-- every value handed out before. Fencing tokens (one counter for task claims
-- and lease grants), KV revisions and stream ids all come from it.
-- (taskspace.backends.base.next_token states the same rule.)
local function next_ids(counter, n)
  local t = redis.call('TIME')
  local wall_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('GET', counter) or '0')
  local first = math.max(last + 1, wall_us)
  redis.call('SET', counter, string.format('%d', first + n - 1))
  return first
end

local function next_tokens(n) return next_ids(P .. 'token', n) end


local function tkey(id) return P .. 't:' .. id end

-- HMGET of `names` as a table keyed by name (a missing field reads false).
local function hmget_named(key, names)
  local values = redis.call('HMGET', key, unpack(names))
  local out = {}
  for i, name in ipairs(names) do out[name] = values[i] end
  return out
end

-- A task's cancel field ('1' cooperative, '2' terminate) asks for a cancel.
local function cancel_requested(cancel) return cancel ~= false and cancel ~= nil and cancel ~= '0' end

local function rkey(queue, name) return P .. 'ready:' .. queue .. '\n' .. name end

-- Add `delta` to the count of `state` in `queue`; a count back at 0 is
-- removed, so the counts of queues and states no longer used do not stay.
local function count(queue, state, delta)
  local field = queue .. '\n' .. state
  if redis.call('HINCRBY', P .. 'counts', field, delta) == 0 then
    redis.call('HDEL', P .. 'counts', field)
  end
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
  redis.call('EXPIRE', key, WAKE_TTL_S)
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
    local t = hmget_named(tkey(id), {'state', 'queue', 'priority', 'seq', 'name'})
    if t.state == 'queued' then make_ready(id, t.queue, t.name, t.priority, t.seq, woken) end
  end
  wake(woken)
  return #due
end

local function expiry_member(state, queue, id) return state .. '\n' .. queue .. '\n' .. id end

-- The task's FIELDS in one string (records.unpack_record reads it): 'R', then
-- per field '-' (absent) or '<length>:<bytes>'.
local function packed_record(id)
  local f = redis.call('HMGET', tkey(id), unpack(FIELDS))
  local parts = {'R'}
  for i = 1, #FIELDS do
    local v = f[i]
    if v then parts[#parts + 1] = #v .. ':' .. v else parts[#parts + 1] = '-' end
  end
  return table.concat(parts)
end

-- A task reached a final state (its hash already says so): free its dedup
-- key, wake registered waiters, schedule its deletion after result_ttl ('' or
-- false: kept forever) by adding its reap entry to `expiring` (flat score,
-- member pairs), which the caller writes with one zadd_pairs(P .. 'expiry',
-- expiring) per script. `waiters` is the task's 'waiters' field (see
-- watch.lua), read by the caller with the rest of the task, so an unwatched
-- task costs no lookup. The first waiter gets the final record itself
-- (packed_record), so it needs no read after its wait; the others get '1'.
local function settle(id, dedup_key, queue, state, now, result_ttl, expiring, waiters)
  local ttl = result_ttl and result_ttl ~= '' and tonumber(result_ttl) or nil
  local backstop_ms = ttl and expire_ms(ttl + BACKSTOP_S)  -- computed before any write
  if dedup_key then
    local dk = P .. 'dedup:' .. dedup_key
    if redis.call('GET', dk) == id then redis.call('DEL', dk) end
  end
  local n = tonumber(waiters or '0')
  if n > 0 then
    local dk = P .. 'done:' .. id
    redis.call('HDEL', tkey(id), 'waiters')
    redis.call('RPUSH', dk, packed_record(id))
    for _ = 2, math.min(n, 16) do redis.call('RPUSH', dk, '1') end
    redis.call('EXPIRE', dk, 60)
  end
  if ttl then
    expiring[#expiring + 1] = now + ttl
    expiring[#expiring + 1] = expiry_member(state, queue, id)
    redis.call('PEXPIRE', tkey(id), backstop_ms)
  end
end

-- Remove a task from whichever claimable set holds it.
local function unready(id, queue, name)
  redis.call('ZREM', rkey(queue, name), id)
  redis.call('ZREM', P .. 'delayed', id)
end

-- Script arguments per pushed task (see queue.push_args): id name payload
-- codec queue priority max_attempts lease_s timeout dedup_key delay
-- result_ttl ('' = none).
local PUSH_N = 12

-- Enqueue the tasks whose PUSH_N arguments start at each index of `starts`
-- in `args` (ready_at on the lease clock `now`, created on the wall clock
-- `created`), filling `woken` for the caller's wake(). Idempotent by id: a
-- task whose id exists is not pushed again; a dedup key held by a live task
-- gives that task's id instead. Returns the id of each task.
local function push_tasks(args, starts, now, created, woken)
  local out, added, ready, index = {}, {}, {}, {}
  local seq = redis.call('INCRBY', P .. 'seq', #starts) - #starts
  for _, i in ipairs(starts) do
    local id, name, payload, codec, queue, priority, max_attempts, lease_s, timeout, dedup,
      delay, result_ttl = unpack(args, i, i + PUSH_N - 1)
    local k = tkey(id)
    local existing = false
    if dedup ~= '' then existing = redis.call('GET', P .. 'dedup:' .. dedup) end
    if existing then
      out[#out + 1] = existing
    elseif redis.call('HSETNX', k, 'id', id) == 0 then
      out[#out + 1] = id  -- pushed before (a retried push): never twice
    else
      seq = seq + 1
      local ready_at = now + tonumber(delay)
      -- One HSET per task, optional fields included; absent counters read as 0.
      local fields = {'name', name, 'payload', payload, 'codec', codec, 'queue', queue,
        'priority', priority, 'max_attempts', max_attempts, 'lease_s', lease_s,
        'state', 'queued', 'ready_at', fmt(ready_at), 'created', fmt(created), 'seq', seq}
      if timeout ~= '' then
        fields[#fields + 1] = 'timeout'
        fields[#fields + 1] = timeout
      end
      if result_ttl ~= '' then
        fields[#fields + 1] = 'result_ttl'
        fields[#fields + 1] = result_ttl
      end
      if dedup ~= '' then
        fields[#fields + 1] = 'dedup_key'
        fields[#fields + 1] = dedup
        redis.call('SET', P .. 'dedup:' .. dedup, id)
      end
      redis.call('HSET', k, unpack(fields))
      added[queue] = (added[queue] or 0) + 1
      index[#index + 1] = seq
      index[#index + 1] = id
      if ready_at > now then
        redis.call('ZADD', P .. 'delayed', ready_at, id)
      else
        local key = queue .. '\n' .. name
        local batch = ready[key]
        if not batch then
          batch = {}
          ready[key] = batch
          redis.call('SADD', P .. 'qnames:' .. queue, name)
        end
        batch[#batch + 1] = score(priority, seq)
        batch[#batch + 1] = id
        woke(woken, queue, name)
      end
      out[#out + 1] = id
    end
  end
  for key, batch in pairs(ready) do zadd_pairs(P .. 'ready:' .. key, batch) end
  zadd_pairs(P .. 'idx', index)
  for queue, n in pairs(added) do count(queue, 'queued', n) end
  return out
end
