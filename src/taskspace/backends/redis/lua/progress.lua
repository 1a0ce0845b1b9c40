-- ARGV: id token done total. 1 if recorded, 0 for a stale lease.
local k = tkey(ARGV[1])
local f = redis.call('HMGET', k, 'state', 'token')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then return 0 end
redis.call('HSET', k, 'pdone', ARGV[3], 'ptotal', ARGV[4])
return 1
