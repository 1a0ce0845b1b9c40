-- ARGV: name holder token ttl. The new expiry, or nil if the grant was lost.
local now = clock()
local z, h = P .. 'lease:' .. ARGV[1], P .. 'leasetok:' .. ARGV[1]
local expires = redis.call('ZSCORE', z, ARGV[2])
if not expires or tonumber(expires) <= now or redis.call('HGET', h, ARGV[2]) ~= ARGV[3] then
  return false
end
local new = now + tonumber(ARGV[4])
redis.call('ZADD', z, new, ARGV[2])
return fmt(new)
