-- ARGV: name. The live grants, oldest token first: {id, holder, token, expires, data} each.
-- Read-only (runs on the reads client): expired grants are skipped, not pruned.
local name = ARGV[1]
local now = clock()
local ids = redis.call('ZRANGEBYSCORE', lease_zset(name), '(' .. fmt(now), '+inf')
local out = {}
for _, id in ipairs(ids) do
  local g = grant_read(name, id)
  if g and g.expires > now then out[#out + 1] = grant_reply(g) end
end
return out
