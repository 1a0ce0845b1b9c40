-- ARGV: key delta ttl('' = none; only when the key is created) request_id
-- request_ttl. {'ok', new value} or {'nan'} (the value is not a 64-bit
-- decimal integer, or the sum leaves 64 bits; nothing written). A repeated request
-- id returns the first reply.
local key, delta, ttl, request = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = clock()
local remembered = request_recall('kvincr', request, now)
if remembered then return remembered end
local touched = {}
kv_expire_due(now, KV_EXPIRE_STEP, touched)
local rec = kv_live(key, now, touched)
local value
if rec then
  local sign, digits = string.match(rec.value, '^([+-]?)(%d+)$')
  if not digits then
    kv_wake(touched, now)
    return {'nan'}
  end
  -- The canonical form HINCRBY accepts: no '+', no leading zeros.
  digits = string.match(digits, '^0*(%d-)$')
  if digits == '' then digits, sign = '0', '' end
  if sign == '+' then sign = '' end
  if sign .. digits ~= rec.value then redis.call('HSET', kv_key(key), 'v', sign .. digits) end
  local sum = redis.pcall('HINCRBY', kv_key(key), 'v', delta)
  if type(sum) == 'table' and sum.err then
    if sign .. digits ~= rec.value then redis.call('HSET', kv_key(key), 'v', rec.value) end
    kv_wake(touched, now)
    return {'nan'}
  end
  value = redis.call('HGET', kv_key(key), 'v')  -- as text: a Lua number has 53 bits
  local rev = kv_next_revision()
  redis.call('HSET', kv_key(key), 'ver', rev)
  kv_log(rev, 0, key, 'put', rev, value)
else
  value = delta
  kv_store(key, value, ttl ~= '' and tonumber(ttl) or nil, now, kv_next_revision(), 0)
end
touched[#touched + 1] = key
kv_wake(touched, now)
local reply = {'ok', value}
request_remember('kvincr', request, reply, now, ARGV[5])
return reply
