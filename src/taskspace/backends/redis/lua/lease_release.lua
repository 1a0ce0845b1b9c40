-- ARGV: name holder token. 1 if released, 0 if no longer held.
local now = clock()
local z, h = P .. 'lease:' .. ARGV[1], P .. 'leasetok:' .. ARGV[1]
local expires = redis.call('ZSCORE', z, ARGV[2])
if not expires or tonumber(expires) <= now or redis.call('HGET', h, ARGV[2]) ~= ARGV[3] then
  return 0
end
redis.call('ZREM', z, ARGV[2])
redis.call('HDEL', h, ARGV[2])
return 1
