-- ARGV: key delta ttl_ms('' = none; applies only when the key is created).
local key = ARGV[1]
local k = P .. 'kv:' .. key
local existed = redis.call('EXISTS', k) == 1
local value = redis.call('HINCRBY', k, 'v', ARGV[2])
redis.call('HSET', k, 'ver', redis.call('INCR', P .. 'kvver'))
if not existed then
  if ARGV[3] ~= '' then
    redis.call('PEXPIRE', k, ARGV[3])
    redis.call('ZADD', P .. 'kvexp', clock() + tonumber(ARGV[3]) / 1000, key)
  end
  redis.call('ZADD', P .. 'kvidx', 0, key)
end
return value
