-- ARGV: limit. Deletes up to `limit` finished tasks past their result_ttl,
-- fixing counts from the expiry member (state\nqueue\nid) even when the
-- backstop EXPIRE already removed the hash. Returns how many.
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
return deleted
