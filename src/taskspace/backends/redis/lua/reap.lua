-- ARGV: limit. Deletes up to `limit` finished tasks past their result_ttl
-- (fixing counts from the expiry member, even when the backstop EXPIRE already
-- removed the hash) and expired KV entries' index entries. Returns how many.
local limit = tonumber(ARGV[1])
local now = clock()
local deleted = 0
local due = redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', now, 'LIMIT', 0, limit)
for _, member in ipairs(due) do
  local state, queue, id = string.match(member, '^([^\n]*)\n(.*)\n([^\n]*)$')
  redis.call('ZREM', P .. 'expiry', member)
  if id then
    local current = redis.call('HGET', tkey(id), 'state')
    if not current or current == state then
      redis.call('DEL', tkey(id))
      redis.call('ZREM', P .. 'idx', id)
      count(queue, state, -1)
      deleted = deleted + 1
    end
  end
end
if deleted < limit then
  local keys = redis.call('ZRANGEBYSCORE', P .. 'kvexp', '-inf', now, 'LIMIT', 0,
    limit - deleted)
  for _, key in ipairs(keys) do
    local ttl = redis.call('PTTL', P .. 'kv:' .. key)
    if ttl == -2 then
      redis.call('ZREM', P .. 'kvidx', key)
      redis.call('ZREM', P .. 'kvexp', key)
      deleted = deleted + 1
    elseif ttl == -1 then
      redis.call('ZREM', P .. 'kvexp', key)
    else
      redis.call('ZADD', P .. 'kvexp', now + ttl / 1000, key)
    end
  end
end
return deleted
