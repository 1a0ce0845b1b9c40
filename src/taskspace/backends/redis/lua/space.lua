-- ARGV: create(0|1), new_id. The space's id (key P..'space'): the existing
-- one; else new_id, set when `create` or when the space holds tasks from
-- before it had an id; else nil (no space here).
local key = P .. 'space'
local id = redis.call('GET', key)
if id then return id end
if ARGV[1] == '1' or redis.call('EXISTS', P .. 'seq', P .. 'counts') > 0 then
  redis.call('SET', key, ARGV[2])
  return ARGV[2]
end
return false
