-- ARGV: id token done total. 1 if recorded, 0 for a stale lease.
local id, token, done, total = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local k = tkey(id)
local t = hmget_named(k, {'state', 'token'})
if t.state ~= 'running' or t.token ~= token then return 0 end
redis.call('HSET', k, 'pdone', done, 'ptotal', total)
return 1
