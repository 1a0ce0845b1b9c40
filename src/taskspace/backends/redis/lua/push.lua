-- ARGV: 11 fields per task: id name payload codec queue priority max_attempts
-- lease_s timeout dedup_key delay ('' = none). Returns the id of each task.
local now = clock()
local out = {}
local woken = {}
local added = {}
local ready = {}
local seq = redis.call('INCRBY', P .. 'seq', #ARGV / 11) - #ARGV / 11
for i = 1, #ARGV, 11 do
  local id, queue, dedup = ARGV[i], ARGV[i + 4], ARGV[i + 9]
  local k = tkey(id)
  local existing = false
  if dedup ~= '' then existing = redis.call('GET', P .. 'dedup:' .. dedup) end
  if existing then
    out[#out + 1] = existing
  elseif redis.call('HSETNX', k, 'id', id) == 0 then
    out[#out + 1] = id  -- pushed before (a retried push): never twice
  else
    seq = seq + 1
    local ready_at = now + tonumber(ARGV[i + 10])
    redis.call('HSET', k, 'name', ARGV[i + 1], 'payload', ARGV[i + 2],
      'codec', ARGV[i + 3], 'queue', queue, 'priority', ARGV[i + 5],
      'max_attempts', ARGV[i + 6], 'lease_s', ARGV[i + 7], 'state', 'queued',
      'ready_at', ready_at, 'created', now, 'seq', seq)  -- absent counters read as 0
    if ARGV[i + 8] ~= '' then redis.call('HSET', k, 'timeout', ARGV[i + 8]) end
    if dedup ~= '' then
      redis.call('HSET', k, 'dedup_key', dedup)
      redis.call('SET', P .. 'dedup:' .. dedup, id)
    end
    added[queue] = (added[queue] or 0) + 1
    if ready_at > now then
      redis.call('ZADD', P .. 'delayed', ready_at, id)
    else
      local batch = ready[queue] or {}
      ready[queue] = batch
      batch[#batch + 1] = score(ARGV[i + 5], seq)
      batch[#batch + 1] = id
    end
    out[#out + 1] = id
  end
end
for queue, batch in pairs(ready) do
  for j = 1, #batch, 2000 do
    redis.call('ZADD', P .. 'ready:' .. queue, unpack(batch, j, math.min(j + 1999, #batch)))
  end
  woken[queue] = #batch / 2
end
for queue, n in pairs(added) do count(queue, 'queued', n) end
wake(woken)
return out
