-- ARGV: id. A task in RETRYABLE_STATES (the generated rules) goes back to its
-- queue with fresh attempts (attempts = lost = 0, ready now, last error kept,
-- progress reset). Returns the state after the call, or nil for an unknown
-- task.
local id = ARGV[1]
local k = tkey(id)
local t = hmget_named(k, {'state', 'queue', 'name', 'priority', 'seq', 'dedup_key'})
if not t.state then return false end
if not RETRYABLE_STATES[t.state] then return t.state end
local now = clock()
local woken = {}
redis.call('ZREM', P .. 'expiry', expiry_member(t.state, t.queue, id))
redis.call('PERSIST', k)
redis.call('DEL', P .. 'done:' .. id)  -- records of its end nobody took: never serve them
redis.call('HSET', k, 'state', 'queued', 'attempts', 0, 'lost', 0, 'ready_at', fmt(now))
redis.call('HDEL', k, 'started', 'finished', 'worker', 'lease_expires', 'cancel', 'pdone', 'ptotal',
  'result')
if t.dedup_key and redis.call('SET', P .. 'dedup:' .. t.dedup_key, id, 'NX') == false then
  redis.call('HDEL', k, 'dedup_key')  -- another live task holds the key now
end
count(t.queue, t.state, -1)
count(t.queue, 'queued', 1)
make_ready(id, t.queue, t.name, t.priority, t.seq, woken)
wake(woken)
return 'queued'
