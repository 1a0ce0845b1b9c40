-- ARGV: queue, after_seq, budget, state... Deletes the tasks of `queue` in the
-- given states (never running: the client refuses it) among the next `budget`
-- tasks of the index after after_seq. Returns {deleted, last seq scanned or
-- false when the index is exhausted}; the client calls again from there, so
-- no call blocks Redis for long (atomicity is per call).
local queue, after, budget = ARGV[1], ARGV[2], tonumber(ARGV[3])
local states = {}
for i = 4, #ARGV do states[ARGV[i]] = true end
local rows = redis.call('ZRANGEBYSCORE', P .. 'idx', '(' .. after, '+inf', 'WITHSCORES',
  'LIMIT', 0, budget)
local deleted = 0
for j = 1, #rows, 2 do
  local id = rows[j]
  local k = tkey(id)
  local t = hmget_named(k, {'state', 'queue', 'name', 'dedup_key'})
  if not t.state then
    redis.call('ZREM', P .. 'idx', id)  -- expired by the backstop; reap fixes its counts
  elseif t.queue == queue and states[t.state] and t.state ~= 'running' then
    if t.state == 'queued' then
      unready(id, queue, t.name)
      if t.dedup_key and redis.call('GET', P .. 'dedup:' .. t.dedup_key) == id then
        redis.call('DEL', P .. 'dedup:' .. t.dedup_key)
      end
    else
      redis.call('ZREM', P .. 'expiry', expiry_member(t.state, queue, id))
    end
    redis.call('DEL', k)
    redis.call('ZREM', P .. 'idx', id)
    count(queue, t.state, -1)
    deleted = deleted + 1
  end
end
if #rows < 2 * budget then return {deleted, false} end
return {deleted, rows[#rows]}
