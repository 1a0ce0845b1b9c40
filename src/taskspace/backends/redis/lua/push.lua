-- ARGV: 12 fields per task: id name payload codec queue priority max_attempts
-- lease_s timeout dedup_key delay result_ttl ('' = none). Returns the id of
-- each task. The client splits large batches into several calls (atomicity
-- is per call), so that no call blocks Redis for long.
local N = 12
local now = clock()
local out = {}
local woken = {}
local added = {}
local ready = {}
local index = {}
local seq = redis.call('INCRBY', P .. 'seq', #ARGV / N) - #ARGV / N
for i = 1, #ARGV, N do
  local id, name, queue, dedup = ARGV[i], ARGV[i + 1], ARGV[i + 4], ARGV[i + 9]
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
    -- One HSET per task, optional fields included; absent counters read as 0.
    local fields = {'name', name, 'payload', ARGV[i + 2], 'codec', ARGV[i + 3],
      'queue', queue, 'priority', ARGV[i + 5], 'max_attempts', ARGV[i + 6],
      'lease_s', ARGV[i + 7], 'state', 'queued', 'ready_at', ready_at, 'created', now,
      'seq', seq}
    if ARGV[i + 8] ~= '' then
      fields[#fields + 1] = 'timeout'
      fields[#fields + 1] = ARGV[i + 8]
    end
    if ARGV[i + 11] ~= '' then
      fields[#fields + 1] = 'result_ttl'
      fields[#fields + 1] = ARGV[i + 11]
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
      batch[#batch + 1] = score(ARGV[i + 5], seq)
      batch[#batch + 1] = id
      woke(woken, queue, name)
    end
    out[#out + 1] = id
  end
end
for key, batch in pairs(ready) do zadd_pairs(P .. 'ready:' .. key, batch) end
zadd_pairs(P .. 'idx', index)
for queue, n in pairs(added) do count(queue, 'queued', n) end
wake(woken)
return out
