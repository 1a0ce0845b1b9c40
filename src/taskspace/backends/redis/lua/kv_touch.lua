-- ARGV: key ttl('' = none). The live key with its new expiry ({value,
-- version, expires or ''}), or false. No new version, revision or change.
local key, ttl = ARGV[1], ARGV[2]
local now = clock()
local touched = {}
local rec = kv_live(key, now, touched)
kv_wake(touched, now)
if not rec then return false end
if ttl == '' then
  rec.expires = nil
  redis.call('HDEL', kv_key(key), 'exp')
  redis.call('ZREM', P .. 'kvexp', key)
else
  rec.expires = now + tonumber(ttl)
  redis.call('HSET', kv_key(key), 'exp', fmt(rec.expires))
  redis.call('ZADD', P .. 'kvexp', rec.expires, key)
end
return kv_reply(rec)
