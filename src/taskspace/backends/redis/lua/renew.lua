-- ARGV: id, token pairs. Returns held | cancel_requested | terminate_requested
-- | lost for each.
local now = clock()
local out = {}
local running = {}
local REQUESTS = {['1'] = 'cancel_requested', ['2'] = 'terminate_requested'}
for i = 1, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local k = tkey(id)
  local t = hmget_named(k, {'state', 'token', 'lease_expires', 'lease_s', 'cancel'})
  if t.state == 'running' and t.token == token and tonumber(t.lease_expires) > now then
    local expires = now + tonumber(t.lease_s)
    redis.call('HSET', k, 'lease_expires', fmt(expires))
    running[#running + 1] = expires
    running[#running + 1] = id
    out[#out + 1] = REQUESTS[t.cancel or ''] or 'held'
  else
    out[#out + 1] = 'lost'
  end
end
zadd_pairs(P .. 'running', running)
return out
