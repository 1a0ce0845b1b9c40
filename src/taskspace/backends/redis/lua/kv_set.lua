-- ARGV: key mode(put|cas) expected('' = absent) value ttl_ms('' = none).
-- The new version, or nil when a compare-and-set did not match.
local key = ARGV[1]
local k = P .. 'kv:' .. key
if ARGV[2] == 'cas' then
  local current = redis.call('HGET', k, 'ver')
  if ARGV[3] == '' then
    if current then return false end
  elseif current ~= ARGV[3] then
    return false
  end
end
local version = redis.call('INCR', P .. 'kvver')
redis.call('HSET', k, 'v', ARGV[4], 'ver', version)
if ARGV[5] ~= '' then
  redis.call('PEXPIRE', k, ARGV[5])
  redis.call('ZADD', P .. 'kvexp', clock() + tonumber(ARGV[5]) / 1000, key)
else
  redis.call('PERSIST', k)
  redis.call('ZREM', P .. 'kvexp', key)
end
redis.call('ZADD', P .. 'kvidx', 0, key)
return version
