-- ARGV: name waiter_id timeout. '0' if a slot is free now; otherwise registers
-- the waiter for `timeout` seconds (so that a release pushes a token to
-- lw:<waiter_id>) and returns the seconds until the earliest live grant expires.
local name, waiter = ARGV[1], ARGV[2]
local now = clock()
local live = lease_prune(name, now)
local cap = tonumber(redis.call('GET', lease_cap_key(name)) or '0')
if live == 0 or live < cap then return '0' end
local first = redis.call('ZRANGE', lease_zset(name), 0, 0, 'WITHSCORES')
local q = P .. 'lwq:' .. name
local timeout = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', q, '-inf', '(' .. fmt(now))  -- waiters that left
redis.call('ZADD', q, now + timeout + 1, waiter)
local ms = math.ceil(timeout * 1000) + 1000
if redis.call('PTTL', q) < ms then redis.call('PEXPIRE', q, ms) end
return fmt(math.max(tonumber(first[2]) - now, 0.001))
