-- ARGV: name holder capacity ttl. {token, expires} or nil when full.
local now = clock()
local name, holder = ARGV[1], ARGV[2]
local z, h = P .. 'lease:' .. name, P .. 'leasetok:' .. name
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now)) do
  redis.call('ZREM', z, gone)
  redis.call('HDEL', h, gone)
end
local expires = now + tonumber(ARGV[4])
if redis.call('ZSCORE', z, holder) then
  redis.call('ZADD', z, expires, holder)
  return {redis.call('HGET', h, holder), fmt(expires)}
end
if redis.call('ZCARD', z) >= tonumber(ARGV[3]) then return false end
local token = redis.call('INCR', P .. 'leasectr:' .. name)
redis.call('ZADD', z, expires, holder)
redis.call('HSET', h, holder, token)
return {string.format('%d', token), fmt(expires)}
