-- ARGV per item: id token kind has_result(0|1) result error('' = none) delay
-- n_followups, then n_followups x PUSH_N push fields. Returns 1 (accepted) or
-- 0 (stale, counted) per item. The new state comes from transition() (the
-- generated rules). An accepted finish records its token in the task's `fin`
-- field: a finish repeated with that token (a retry after a lost reply) is
-- answered 1 again with no effect, until the task is claimed again (a claim
-- changes its token). Follow-ups of accepted items are pushed after every
-- item is settled (so a follow-up may take the dedup key its parent freed).
local FINISH_FIELDS = {'state', 'token', 'fin', 'attempts', 'max_attempts', 'cancel', 'queue',
  'priority', 'seq', 'dedup_key', 'name', 'result_ttl', 'waiters'}
local now = clock()
local ended_at = wall()
local out = {}
local stale = 0
local woken = {}
local counts = {}
local ended = {}
local expiring = {}
local followups = {}
local i = 1
while i <= #ARGV do
  local id, token, kind, has_result, result, err, delay, n_followups = unpack(ARGV, i, i + 7)
  local first_followup = i + 8
  i = first_followup + tonumber(n_followups) * PUSH_N
  local k = tkey(id)
  local t = hmget_named(k, FINISH_FIELDS)
  if t.token == token and t.fin == token then
    out[#out + 1] = 1  -- accepted before: a retry after a lost reply
  elseif t.state ~= 'running' or t.token ~= token then
    stale = stale + 1
    out[#out + 1] = 0
  else
    local attempts = tonumber(t.attempts)
    local state = transition(kind, cancel_requested(t.cancel), attempts,
      tonumber(t.max_attempts))
    local q = t.queue
    ended[#ended + 1] = id
    local c = counts[q] or {}
    counts[q] = c
    c.running = (c.running or 0) - 1
    c[state] = (c[state] or 0) + 1
    local set = {'state', state, 'fin', token}
    if err ~= '' then
      set[#set + 1] = 'error'
      set[#set + 1] = err
    end
    if state == 'queued' then
      if kind == 'release' then
        set[#set + 1] = 'attempts'
        set[#set + 1] = attempts - 1
        redis.call('HDEL', k, 'pdone', 'ptotal')  -- a released task starts afresh
      end
      local ready_at = now + tonumber(delay)
      set[#set + 1] = 'ready_at'
      set[#set + 1] = fmt(ready_at)
      redis.call('HSET', k, unpack(set))
      redis.call('HDEL', k, 'worker', 'lease_expires')
      enqueue(id, q, t.name, t.priority, t.seq, ready_at, now, woken)
    else
      set[#set + 1] = 'finished'
      set[#set + 1] = fmt(ended_at)
      if has_result == '1' then
        set[#set + 1] = 'result'
        set[#set + 1] = result
      end
      redis.call('HSET', k, unpack(set))
      redis.call('HDEL', k, 'lease_expires')
      settle(id, t.dedup_key, q, state, now, t.result_ttl, expiring, t.waiters)
    end
    for j = first_followup, i - 1, PUSH_N do followups[#followups + 1] = j end
    out[#out + 1] = 1
  end
end
for j = 1, #ended, 4000 do
  redis.call('ZREM', P .. 'running', unpack(ended, j, math.min(j + 3999, #ended)))
end
for q, c in pairs(counts) do
  for state, delta in pairs(c) do count(q, state, delta) end
end
zadd_pairs(P .. 'expiry', expiring)
if stale > 0 then redis.call('INCRBY', P .. 'stale', stale) end
if #followups > 0 then push_tasks(ARGV, followups, now, ended_at, woken) end
wake(woken)
return out
