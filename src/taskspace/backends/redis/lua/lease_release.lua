-- ARGV: name id token. 1 if released (waiters woken), 0 if no longer current.
local name, id = ARGV[1], ARGV[2]
local now = clock()
if not grant_current(name, id, ARGV[3], now) then return 0 end
grant_delete(name, id)
redis.call('ZREM', lease_zset(name), id)
lease_cap_expire(name, now)
lease_wake(name, now)
return 1
