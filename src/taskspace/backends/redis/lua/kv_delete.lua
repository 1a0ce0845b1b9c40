-- ARGV: key expected_version('' = any). 1 if deleted.
local k = P .. 'kv:' .. ARGV[1]
local current = redis.call('HGET', k, 'ver')
if not current or (ARGV[2] ~= '' and current ~= ARGV[2]) then return 0 end
redis.call('DEL', k)
redis.call('ZREM', P .. 'kvidx', ARGV[1])
redis.call('ZREM', P .. 'kvexp', ARGV[1])
return 1
