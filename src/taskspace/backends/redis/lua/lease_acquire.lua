-- ARGV: name grant_id holder capacity ttl data.
-- {'ok', id, holder, token, expires, data}: the new grant, or the live grant
-- with this id unchanged (a retried acquire); {'full'}; {'capacity', live_capacity};
-- {'grant_id', other_name} when the id is a live grant of another name.
local name, id, holder = ARGV[1], ARGV[2], ARGV[3]
local capacity, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = clock()
local live = lease_prune(name, now)
local other = redis.call('GET', grant_name_key(id))
if other and other ~= name then
  local g = grant_read(other, id)
  if g and g.expires > now then return {'grant_id', other} end
end
local existing = grant_read(name, id)
if existing and existing.expires > now then
  return {'ok', unpack(grant_reply(existing))}
end
local stored = redis.call('GET', lease_cap_key(name))
if live > 0 and stored and tonumber(stored) ~= capacity then return {'capacity', stored} end
if live >= capacity then return {'full'} end
local g = {id = id, holder = holder, token = string.format('%d', next_tokens(1)),
  expires = now + ttl, data = ARGV[6]}
grant_write(name, g, now)
redis.call('SET', lease_cap_key(name), capacity)
lease_cap_expire(name, now)
return {'ok', unpack(grant_reply(g))}
