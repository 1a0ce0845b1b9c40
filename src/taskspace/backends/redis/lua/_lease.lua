-- Named leases (library of the lease_* scripts; kv_txn reads it too, for GrantHeld).
--
-- Keys of a name N (all deleted or expiring once N has no live grant):
--   lz:N          zset: grant id -> expires (lease clock); the live grants
--                 (PEXPIREd with the last grant, as lc:N).
--   lg:N\nID      hash: holder, token, expires, data; one grant. PEXPIREd at its
--                 expiry (+ GRANT_SLACK_MS), deleted by release or pruning.
--   lc:N          the capacity while N has live grants (PEXPIREd with the last grant).
--   lwq:N         zset: waiter id -> end of its registration (lease clock): the
--                 waiters of N, registered by lease_wait; deleted by release,
--                 and expiring with the longest registration.
--   lw:ID         one waiter's wake list: release pushes a token (expires after WAKE_KEEP_MS).
--   lgid:ID       the name whose grant ID is (a grant id is live under one name at
--                 a time); PEXPIREd with the grant, deleted with it.
local GRANT_SLACK_MS = 1000
local WAKE_KEEP_MS = 2000

local function lease_zset(name) return P .. 'lz:' .. name end
local function lease_cap_key(name) return P .. 'lc:' .. name end
local function grant_key(name, id) return P .. 'lg:' .. name .. '\n' .. id end
local function grant_name_key(id) return P .. 'lgid:' .. id end

-- Delete grant `id` of `name` and its id entry (if the entry is still this name's).
local function grant_delete(name, id)
  redis.call('DEL', grant_key(name, id))
  if redis.call('GET', grant_name_key(id)) == name then redis.call('DEL', grant_name_key(id)) end
end

-- The grant `id` of `name` as a record with named fields, or nil.
local function grant_read(name, id)
  local f = redis.call('HMGET', grant_key(name, id), 'holder', 'token', 'expires', 'data')
  if not f[2] then return nil end
  return {id = id, holder = f[1], token = f[2], expires = tonumber(f[3]), data = f[4] or ''}
end

-- The reply form of a grant: {id, holder, token, expires, data}.
local function grant_reply(g)
  return {g.id, g.holder, g.token, fmt(g.expires), g.data}
end

-- True if grant `id` of `name` exists with `token` and has not expired at `now`.
local function grant_current(name, id, token, now)
  local g = grant_read(name, id)
  return g ~= nil and g.token == token and g.expires > now
end

-- Keep the grant index and the capacity of `name` as long as its
-- longest-lived grant (+ GRANT_SLACK_MS), no longer.
local function lease_cap_expire(name, now)
  local last = redis.call('ZRANGE', lease_zset(name), -1, -1, 'WITHSCORES')
  if last[2] then
    local ms = expire_ms(tonumber(last[2]) - now + GRANT_SLACK_MS / 1000)
    redis.call('PEXPIRE', lease_cap_key(name), ms)
    redis.call('PEXPIRE', lease_zset(name), ms)
  else
    redis.call('DEL', lease_cap_key(name))
  end
end

-- Drop the expired grants of `name`; returns how many live ones remain.
local function lease_prune(name, now)
  local z = lease_zset(name)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(gone) do
    redis.call('ZREM', z, id)
    grant_delete(name, id)
  end
  local live = redis.call('ZCARD', z)
  if live == 0 and #gone > 0 then redis.call('DEL', lease_cap_key(name)) end
  return live
end

-- Store grant `g` of `name` (new or renewed).
local function grant_write(name, g, now)
  local ms = expire_ms(g.expires - now + GRANT_SLACK_MS / 1000)  -- before any write
  local k = grant_key(name, g.id)
  redis.call('HSET', k, 'holder', g.holder, 'token', g.token, 'expires', fmt(g.expires),
    'data', g.data)
  redis.call('PEXPIRE', k, ms)
  redis.call('SET', grant_name_key(g.id), name, 'PX', ms)
  redis.call('ZADD', lease_zset(name), g.expires, g.id)
end

-- Wake every waiter registered on `name` (one token in each one's own list).
local function lease_wake(name, now)
  local q = P .. 'lwq:' .. name
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', q, now, '+inf')) do
    local w = P .. 'lw:' .. id
    redis.call('RPUSH', w, '1')
    redis.call('PEXPIRE', w, WAKE_KEEP_MS)
  end
  redis.call('DEL', q)
end
