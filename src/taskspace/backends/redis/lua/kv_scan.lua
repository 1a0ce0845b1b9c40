-- ARGV: prefix limit(-1 = all). Flat list key, value, version, expires|''.
local prefix, limit = ARGV[1], tonumber(ARGV[2])
local low, high = '-', '+'
if prefix ~= '' then low, high = '[' .. prefix, '[' .. prefix .. '\255' end
local keys = redis.call('ZRANGEBYLEX', P .. 'kvidx', low, high)
local now = clock()
local out = {}
local found = 0
for _, key in ipairs(keys) do
  if limit >= 0 and found >= limit then break end
  local k = P .. 'kv:' .. key
  local f = redis.call('HMGET', k, 'v', 'ver')
  if f[1] then
    local ttl = redis.call('PTTL', k)
    out[#out + 1] = key
    out[#out + 1] = f[1]
    out[#out + 1] = f[2]
    out[#out + 1] = (ttl >= 0) and fmt(now + ttl / 1000) or ''
    found = found + 1
  else
    redis.call('ZREM', P .. 'kvidx', key)  -- expired: drop it from the indexes
    redis.call('ZREM', P .. 'kvexp', key)
  end
end
return out
