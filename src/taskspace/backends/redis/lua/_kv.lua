-- requires: _request.lua
-- Versioned KV (library of the kv_* scripts). Keys under P:
--   kv:<key>        hash: v (value), ver (version = revision of the write), exp
--                   (expiry on the lease clock; absent: no TTL).
--   kvidx           zset, every score 0: the stored keys, for scans in key order.
--   kvexp           zset: key -> expiry, for keys with a TTL.
--   kvrev           the space's KV revision, the last one handed out (see
--                   kv_next_revision: not dense, never handed out twice).
--   kvlog           stream: the change feed; entry id <revision>-<n> (n: the
--                   write's index within its txn), fields k, kind, ver[, v].
--   kvcompact       the newest revision compaction dropped from kvlog.
--   kvreq, kvreqexp request id -> remembered reply (JSON), and -> expiry.
--   kvwaiters       zset: '<waiter id>\n<prefix>' -> end of its registration
--                   (lease clock); a matching write removes the member.
--   kvw:<waiter id> a waiter's wake list: a matching write pushes one token
--                   (expires after KV_WAKE_KEEP_MS).
-- Expired keys are removed (and their expiry logged) by the first script that
-- notices them: every write, changes, wait and reap runs kv_expire_due first.
local KV_EXPIRE_STEP = 100
local KV_WAKE_KEEP_MS = 2000

local function kv_key(key) return P .. 'kv:' .. key end

-- The stored record of `key` ({value, version, expires}; expires nil: no TTL),
-- expired or not, or nil.
local function kv_read(key)
  local f = redis.call('HMGET', kv_key(key), 'v', 'ver', 'exp')
  if not f[2] then return nil end
  return {value = f[1], version = f[2], expires = f[3] and tonumber(f[3]) or nil}
end

-- The reply form of a live record: {value, version, expires or ''}.
local function kv_reply(rec)
  return {rec.value, rec.version, rec.expires and fmt(rec.expires) or ''}
end

local function kv_is_live(rec, now)
  return rec ~= nil and (rec.expires == nil or rec.expires > now)
end

-- The next revision of the space, as text: above every earlier one and never
-- below the server's wall clock in microseconds (the fencing tokens' rule,
-- base.next_token), so a kvrev that lost its last writes (a failover to a
-- replica that missed them) still restarts above every revision handed out
-- before, and a version read from a lost write can never match again.
-- Revisions stay below 2^53 (exact in a Lua number) until the year 2255.
local function kv_next_revision()
  return string.format('%d', next_ids(P .. 'kvrev', 1))
end

local function kv_log(rev, n, key, kind, version, value)
  local id = rev .. '-' .. n
  if value then
    redis.call('XADD', P .. 'kvlog', id, 'k', key, 'kind', kind, 'ver', version, 'v', value)
  else
    redis.call('XADD', P .. 'kvlog', id, 'k', key, 'kind', kind, 'ver', version)
  end
end

-- Delete the stored key (with its index entries) and log `kind` at rev-n.
local function kv_remove(key, rec, rev, n, kind)
  redis.call('DEL', kv_key(key))
  redis.call('ZREM', P .. 'kvidx', key)
  redis.call('ZREM', P .. 'kvexp', key)
  kv_log(rev, n, key, kind, rec.version)
end

-- Store a put of `key` at rev-n; ttl in seconds or nil. Returns the expiry or nil.
local function kv_store(key, value, ttl, now, rev, n)
  local k = kv_key(key)
  local expires = nil
  if ttl then
    expires = now + ttl
    redis.call('HSET', k, 'v', value, 'ver', rev, 'exp', fmt(expires))
    redis.call('ZADD', P .. 'kvexp', expires, key)
  else
    redis.call('HSET', k, 'v', value, 'ver', rev)
    redis.call('HDEL', k, 'exp')
    redis.call('ZREM', P .. 'kvexp', key)
  end
  redis.call('ZADD', P .. 'kvidx', 0, key)
  kv_log(rev, n, key, 'put', rev, value)
  return expires
end

-- Record the expiry of up to `limit` keys whose TTL passed, each at its own
-- revision; appends their keys to `touched`. Returns how many expired.
local function kv_expire_due(now, limit, touched)
  local due = redis.call('ZRANGEBYSCORE', P .. 'kvexp', '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, key in ipairs(due) do
    local rec = kv_read(key)
    if rec and rec.expires and rec.expires <= now then
      kv_remove(key, rec, kv_next_revision(), 0, 'expire')
      touched[#touched + 1] = key
      n = n + 1
    elseif rec and rec.expires then
      redis.call('ZADD', P .. 'kvexp', rec.expires, key)  -- a stale index entry
    else
      redis.call('ZREM', P .. 'kvexp', key)
    end
  end
  return n
end

-- The live record of `key`, or nil; a record whose TTL passed is expired
-- (logged) here, its key appended to `touched`.
local function kv_live(key, now, touched)
  local rec = kv_read(key)
  if rec and rec.expires and rec.expires <= now then
    kv_remove(key, rec, kv_next_revision(), 0, 'expire')
    touched[#touched + 1] = key
    return nil
  end
  return rec
end

-- Wake every registered waiter whose prefix one of `keys` starts with.
local function kv_wake(keys, now)
  if #keys == 0 then return end
  local z = P .. 'kvwaiters'
  if redis.call('EXISTS', z) == 0 then return end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', '(' .. fmt(now))  -- waiters that left
  for _, member in ipairs(redis.call('ZRANGE', z, 0, -1)) do
    local waiter, prefix = string.match(member, '^([^\n]*)\n(.*)$')
    for _, key in ipairs(keys) do
      if string.sub(key, 1, #prefix) == prefix then
        local w = P .. 'kvw:' .. waiter
        redis.call('RPUSH', w, '1')
        redis.call('PEXPIRE', w, KV_WAKE_KEEP_MS)
        redis.call('ZREM', z, member)
        break
      end
    end
  end
end

-- Changes of keys starting with `prefix` after stream id `from` (exclusive;
-- '-' for the start), scanning at most `budget` entries. Collects matches as
-- {revision, key, kind, version, value or ''} until it holds `limit` of them
-- (`limit` may be 0: the caller's page is full already) and then only those of
-- the revision being read, so it stops at a revision boundary: a revision it
-- returns changes of is complete, unless the scan ran out of budget.
-- `open_rev` is the revision of the caller's last match so far ('' if none).
-- Returns the matches, the last id scanned and 'full' (stopped at a boundary
-- with `limit` matches), 'end' (reached the end of the feed) or 'more'
-- (budget spent: call again from the last id).
local function kv_scan_log(prefix, from, limit, budget, open_rev)
  local start = from == '-' and '-' or '(' .. from
  local entries = redis.call('XRANGE', P .. 'kvlog', start, '+', 'COUNT', budget)
  local out, last, current = {}, from, open_rev
  for _, entry in ipairs(entries) do
    local rev = string.match(entry[1], '^(%d+)')
    if #out >= limit and rev ~= current then return out, last, 'full' end
    last = entry[1]
    local f = {}
    for j = 1, #entry[2], 2 do f[entry[2][j]] = entry[2][j + 1] end
    if string.sub(f.k, 1, #prefix) == prefix then
      out[#out + 1] = {rev, f.k, f.kind, f.ver, f.v or ''}
      current = rev
    end
  end
  return out, last, #entries < budget and 'end' or 'more'
end

-- The compaction point (newest dropped revision, 0: none).
local function kv_compacted()
  return tonumber(redis.call('GET', P .. 'kvcompact') or '0')
end

local function kv_revision()
  return redis.call('GET', P .. 'kvrev') or '0'
end
