-- Streams (library of the stream_* scripts). Keys under P:
--   s:<stream>      a Redis stream; entry id <n>-0, fields d (data), t (wall clock).
--   sid:<stream>    the last id handed out (see stream_next_ids), so ids are never
--                   reused after a trim.
--   sreq, sreqexp   request id -> remembered reply (JSON), and -> expiry.
local REQUEST_MAX = 100000

local function stream_key(stream) return P .. 's:' .. stream end

-- The first of the next n ids of `stream` (the n are consecutive): above every
-- id handed out before and never below the server's wall clock in
-- microseconds (the fencing tokens' rule, base.next_token), so a counter that
-- lost its last appends (a failover to a replica that missed them) still
-- restarts above every id handed out before. Ids are therefore not dense;
-- they stay below 2^53 (exact in a Lua number) until the year 2255.
local function stream_next_ids(stream, n)
  local t = redis.call('TIME')
  local wall_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local key = P .. 'sid:' .. stream
  local last = tonumber(redis.call('GET', key) or '0')
  local first = math.max(last + 1, wall_us)
  redis.call('SET', key, string.format('%d', first + n - 1))
  return first
end

-- Request ids of `family` (a key name): the remembered reply, or nil. Prunes
-- a few expired ids on every call, so the family stays bounded by what
-- REQUEST_ID_TTL_S of requests leave (and never above REQUEST_MAX ids), and
-- expires REQUEST_ID_TTL_S after its last request.
-- (The same rule as _kv.lua's: one library per script.)
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
