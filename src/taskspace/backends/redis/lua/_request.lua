-- Request ids (a library: scripts name it with a `requires` line). A reply
-- remembered by id makes a call whose reply was lost safe to retry.
local REQUEST_MAX = 100000

-- Request ids of `family` (a key name): the remembered reply, or nil. Prunes
-- a few expired ids on every call, so the family stays bounded by what
-- REQUEST_ID_TTL_S of requests leave (and never above REQUEST_MAX ids), and
-- expires REQUEST_ID_TTL_S after its last request.
local function request_recall(family, id, now)
  local exp = P .. family .. 'exp'
  local old = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, 16)
  for _, gone in ipairs(old) do
    redis.call('ZREM', exp, gone)
    redis.call('HDEL', P .. family, gone)
  end
  if id == '' then return nil end
  local reply = redis.call('HGET', P .. family, id)
  if reply then return cjson.decode(reply) end
  return nil
end

local function request_remember(family, id, reply, now, ttl)
  if id == '' then return end
  local exp = P .. family .. 'exp'
  redis.call('HSET', P .. family, id, cjson.encode(reply))
  redis.call('ZADD', exp, now + tonumber(ttl), id)
  -- Both keys go REQUEST_ID_TTL_S after the last request of the family.
  local ms = math.ceil(tonumber(ttl) * 1000) + 1000
  redis.call('PEXPIRE', P .. family, ms)
  redis.call('PEXPIRE', exp, ms)
  if redis.call('ZCARD', exp) > REQUEST_MAX then
    local popped = redis.call('ZPOPMIN', exp, 16)
    for i = 1, #popped, 2 do redis.call('HDEL', P .. family, popped[i]) end
  end
end
