-- ARGV: ids. The client sends BLPOP on the ids' done lists right behind this
-- script (one round trip). If one of them has ended, its final record
-- (packed_record; '1' for a task that does not exist) goes to its done list
-- for that BLPOP, and 1 is returned. Otherwise interest is registered, so
-- that finishing any of them pushes to its done list, and 0 is returned.
for _, id in ipairs(ARGV) do
  local state = redis.call('HGET', tkey(id), 'state')
  if not state or not LIVE_STATES[state] then
    local done = P .. 'done:' .. id
    redis.call('RPUSH', done, state and packed_record(id) or '1')
    redis.call('EXPIRE', done, 60)
    return 1
  end
end
-- The count lives in the task's hash (field 'waiters'), so settling reads it
-- with the fields it reads anyway; settle() clears it.
for _, id in ipairs(ARGV) do redis.call('HINCRBY', tkey(id), 'waiters', 1) end
return 0
