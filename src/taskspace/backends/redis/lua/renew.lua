-- ARGV: id, token pairs. Returns held | cancel_requested | terminate_requested
-- | lost for each.
local now = clock()
local out = {}
local running = {}
local REQUESTS = {['1'] = 'cancel_requested', ['2'] = 'terminate_requested'}
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'state', 'token', 'lease_expires', 'lease_s', 'cancel')
  if f[1] == 'running' and f[2] == ARGV[i + 1] and tonumber(f[3]) > now then
    local expires = now + tonumber(f[4])
    redis.call('HSET', k, 'lease_expires', expires)
    running[#running + 1] = expires
    running[#running + 1] = id
    out[#out + 1] = REQUESTS[f[5] or ''] or 'held'
  else
    out[#out + 1] = 'lost'
  end
end
zadd_pairs(P .. 'running', running)
return out
