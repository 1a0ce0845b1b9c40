-- ARGV: worker, n, request_id ('' = none), queue... Leases up to n ready
-- tasks; returns their fields. Hot path: three calls per task, batched ZADD
-- and counters. A repeat of a request id (its reply was lost, the worker
-- retried) returns the tasks the first call leased, never new ones.
local worker, n, request = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
if request ~= '' then
  local rk = P .. 'claimreq:' .. request
  local granted = redis.call('LRANGE', rk, 0, -1)
  if #granted > 0 then
    for _, id in ipairs(granted) do
      local f = redis.call('HMGET', tkey(id), unpack(FIELDS))
      if f[11] == 'running' and f[16] == worker then out[#out + 1] = f end
    end
    return out
  end
end
local now = clock()
promote(now)
local running = {}
local seen = {}
for qi = 4, #ARGV do
  local q = ARGV[qi]
  if not seen[q] and #out < n then
    seen[q] = true
    local popped = redis.call('ZPOPMIN', P .. 'ready:' .. q, n - #out)
    local got = 0
    local token = redis.call('INCRBY', P .. 'token', #popped / 2) - #popped / 2
    for j = 1, #popped, 2 do
      local id = popped[j]
      local k = tkey(id)
      local f = redis.call('HMGET', k, unpack(FIELDS))
      if f[11] == 'queued' then
        token = token + 1
        got = got + 1
        local expires = fmt(now + tonumber(f[8]))
        local attempts = (tonumber(f[13]) or 0) + 1
        redis.call('HSET', k, 'state', 'running', 'token', token, 'worker', worker,
          'lease_expires', expires, 'started', fmt(now), 'attempts', attempts)
        f[11], f[13], f[15], f[16] = 'running', attempts, token, worker
        f[17], f[24] = expires, fmt(now)
        running[#running + 1] = expires
        running[#running + 1] = id
        out[#out + 1] = f
      end
    end
    if got > 0 then
      count(q, 'queued', -got)
      count(q, 'running', got)
    end
  end
end
for i = 1, #running, 2000 do
  redis.call('ZADD', P .. 'running', unpack(running, i, math.min(i + 1999, #running)))
end
if request ~= '' and #out > 0 then
  local rk = P .. 'claimreq:' .. request
  for i = 1, #out do redis.call('RPUSH', rk, out[i][1]) end
  redis.call('EXPIRE', rk, 600)
end
return out
