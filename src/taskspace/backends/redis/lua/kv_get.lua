-- ARGV: key. {value, version, expires or false} or nil.
local k = P .. 'kv:' .. ARGV[1]
local f = redis.call('HMGET', k, 'v', 'ver')
if not f[1] then return false end
local ttl = redis.call('PTTL', k)
local expires = false
if ttl >= 0 then expires = fmt(clock() + ttl / 1000) end
return {f[1], f[2], expires}
