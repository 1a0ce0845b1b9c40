-- ARGV: name timeout. Seconds until the earliest live grant expires (0: a slot
-- is free now); otherwise registers a waiter for `timeout` seconds, so that a
-- release pushes a token to lw:<name>.
local name = ARGV[1]
local now = clock()
local live = lease_prune(name, now)
local cap = tonumber(redis.call('GET', lease_cap_key(name)) or '0')
if live == 0 or live < cap then return '0' end
local first = redis.call('ZRANGE', lease_zset(name), 0, 0, 'WITHSCORES')
local k = P .. 'lwn:' .. name
local ms = math.ceil(tonumber(ARGV[2]) * 1000) + 1000
redis.call('INCR', k)
if redis.call('PTTL', k) < ms then redis.call('PEXPIRE', k, ms) end
return fmt(math.max(tonumber(first[2]) - now, 0.001))
