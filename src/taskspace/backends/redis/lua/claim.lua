-- ARGV: worker, n, queue... Leases up to n ready tasks; returns their fields.
local now = clock()
promote(now)
local worker, n = ARGV[1], tonumber(ARGV[2])
local out = {}
local seen = {}
for qi = 3, #ARGV do
  local q = ARGV[qi]
  if not seen[q] and #out < n then
    seen[q] = true
    local popped = redis.call('ZPOPMIN', P .. 'ready:' .. q, n - #out)
    local before = #out
    for j = 1, #popped, 2 do
      local id = popped[j]
      local k = tkey(id)
      local f = redis.call('HMGET', k, 'state', 'lease_s')
      if f[1] == 'queued' then
        local token = redis.call('INCR', P .. 'token')
        local expires = now + tonumber(f[2])
        redis.call('HSET', k, 'state', 'running', 'token', token, 'worker', worker,
          'lease_expires', expires, 'started', now)
        redis.call('HINCRBY', k, 'attempts', 1)
        redis.call('ZADD', P .. 'running', expires, id)
        out[#out + 1] = redis.call('HMGET', k, unpack(FIELDS))
      end
    end
    if #out > before then
      count(q, 'queued', before - #out)
      count(q, 'running', #out - before)
    end
  end
end
return out
