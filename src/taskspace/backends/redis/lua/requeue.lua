-- ARGV: history_max (base.ERROR_HISTORY_MAX). Expired leases move as
-- transition('expired', ...) says (the generated rules: back to the queue with
-- lost + 1, dead once attempts are spent, cancelled if a cancel was asked);
-- the error keeps a flat, bounded history (outcomes.with_history). Everything
-- a task's move needs is computed before anything is written, so an
-- unreadable earlier error can never leave a task half-moved or stop the other
-- tasks being handled.
local HISTORY_MAX = tonumber(ARGV[1])
local now = clock()
local ids = redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now, 'LIMIT', 0, 1000)
local handled = 0
local woken = {}
local expiring = {}

-- with_history(error, previous), from the earlier error's JSON (or false).
local function with_history(err, previous_json)
  if not previous_json then return cjson.encode(err) end
  local ok, previous = pcall(cjson.decode, previous_json)
  if not ok or type(previous) ~= 'table' then
    previous = {type = 'UnreadableError', message = 'an earlier error could not be read',
      traceback = ''}
  end
  local earlier = {}
  for key, value in pairs(previous) do
    -- `previous` nested the history before it was bounded: never carried on.
    if key ~= 'history' and key ~= 'previous' then earlier[key] = value end
  end
  local history = {earlier}
  if type(previous.history) == 'table' then
    for _, h in ipairs(previous.history) do
      if #history >= HISTORY_MAX then break end
      history[#history + 1] = h
    end
  end
  err.history = history
  local encoded, text = pcall(cjson.encode, err)
  if encoded then return text end
  err.history = nil
  return cjson.encode(err)
end

local ended_at = fmt(wall())
local FIELDS_READ = {'state', 'lease_expires', 'attempts', 'max_attempts', 'cancel', 'queue',
  'priority', 'seq', 'dedup_key', 'worker', 'error', 'name', 'result_ttl', 'waiters'}
for _, id in ipairs(ids) do
  local k = tkey(id)
  local t = hmget_named(k, FIELDS_READ)
  if t.state == 'running' and tonumber(t.lease_expires) <= now then
    local attempts, max_attempts, q = tonumber(t.attempts), tonumber(t.max_attempts), t.queue
    local state = transition('expired', cancel_requested(t.cancel), attempts, max_attempts)
    local err = with_history({type = 'WorkerLost', traceback = '', message = string.format(
      'lease expired on attempt %d of %d (worker %s); the worker died or stalled',
      attempts, max_attempts, t.worker or 'None')}, t.error)
    handled = handled + 1
    redis.call('ZREM', P .. 'running', id)
    redis.call('HSET', k, 'state', state, 'error', err)
    redis.call('HINCRBY', k, 'lost', 1)
    redis.call('HDEL', k, 'lease_expires')
    count(q, 'running', -1)
    count(q, state, 1)
    if state == 'queued' then
      redis.call('HDEL', k, 'worker')
      redis.call('HSET', k, 'ready_at', fmt(now))
      enqueue(id, q, t.name, t.priority, t.seq, now, now, woken)
    else
      redis.call('HSET', k, 'finished', ended_at)
      settle(id, t.dedup_key, q, state, now, t.result_ttl, expiring, t.waiters)
    end
  elseif t.state == 'running' then
    -- renewed meanwhile: keep its real expiry
    redis.call('ZADD', P .. 'running', t.lease_expires, id)
  else
    redis.call('ZREM', P .. 'running', id)  -- finished meanwhile
  end
end
zadd_pairs(P .. 'expiry', expiring)
wake(woken)
return handled
