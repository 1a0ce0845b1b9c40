-- ARGV: id terminate(0|1). Returns the state after the call, or nil for an
-- unknown task. A task in CANCEL_AT_ONCE_STATES (the generated rules) ends
-- cancelled; a running one gets cancel=1 (cooperative) or 2 (terminate), and
-- a later plain cancel never downgrades 2; any other state is left alone.
local id, terminate = ARGV[1], ARGV[2]
local k = tkey(id)
local t = hmget_named(k, {'state', 'queue', 'dedup_key', 'name', 'result_ttl', 'cancel',
  'waiters'})
if not t.state then return false end
if CANCEL_AT_ONCE_STATES[t.state] then
  local now = clock()
  unready(id, t.queue, t.name)
  redis.call('HSET', k, 'state', 'cancelled', 'finished', fmt(wall()))
  count(t.queue, t.state, -1)
  count(t.queue, 'cancelled', 1)
  local expiring = {}
  settle(id, t.dedup_key, t.queue, 'cancelled', now, t.result_ttl, expiring, t.waiters)
  zadd_pairs(P .. 'expiry', expiring)
  return 'cancelled'
end
if t.state == 'running' then
  if terminate == '1' then redis.call('HSET', k, 'cancel', 2)
  elseif t.cancel ~= '2' then redis.call('HSET', k, 'cancel', 1) end
end
return t.state
