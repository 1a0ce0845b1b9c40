-- ARGV: create(0|1), new_id. The space's id (key P..'space'): the existing
-- one; else new_id, set when `create` or when the space holds tasks from
-- before it had an id; else nil (no space here).
local create, new_id = ARGV[1], ARGV[2]
local key = P .. 'space'
local id = redis.call('GET', key)
if id then return id end
if create == '1' or redis.call('EXISTS', P .. 'seq', P .. 'counts') > 0 then
  redis.call('SET', key, new_id)
  return new_id
end
return false
