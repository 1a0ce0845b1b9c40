-- requires: _lease.lua
-- ARGV: request_id('' = none) request_ttl n_compares, then 4 per compare:
--   'ver' key version('' = absent) '' | 'val' key value '' | 'ex' key 1|0 '' |
--   'grant' lease_name grant_id token
-- then 4 per write: 'put' key value ttl('' = none) | 'del' key '' ''.
-- {1, revision, '', version, expires or '' per put} if every compare held and
-- the writes were applied; {0, current revision, index of the first failed
-- compare (0-based)} otherwise. A repeated request id returns the first reply.
local request, request_ttl, nc = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = clock()
local remembered = request_recall('kvreq', request, now)
if remembered then return remembered end
local touched = {}
kv_expire_due(now, KV_EXPIRE_STEP, touched)

local function holds(kind, a, b, c)
  if kind == 'grant' then return grant_current(a, b, c, now) end
  local rec = kv_live(a, now, touched)
  if kind == 'ver' then
    if b == '' then return rec == nil end
    return rec ~= nil and rec.version == b
  elseif kind == 'val' then
    return rec ~= nil and rec.value == b
  else
    return (rec ~= nil) == (b == '1')
  end
end

local first_write = 4 + 4 * nc
for i = 0, nc - 1 do
  local at = 4 + 4 * i
  if not holds(ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]) then
    kv_wake(touched, now)
    local reply = {0, kv_revision(), i}
    request_remember('kvreq', request, reply, now, request_ttl)
    return reply
  end
end

-- Every written key's record first: a key whose TTL passed logs its expiry
-- (at its own revision) before the txn's revision is taken, so the feed stays
-- in revision order, as on memory and SQLite.
local live = {}
for at = first_write, #ARGV, 4 do
  live[at] = kv_live(ARGV[at + 1], now, touched) or false
end
local reply = {1, '', ''}
local rev = nil
local n = 0
for at = first_write, #ARGV, 4 do
  local kind, key = ARGV[at], ARGV[at + 1]
  if kind == 'put' then
    rev = rev or kv_next_revision()
    local ttl = ARGV[at + 3] ~= '' and tonumber(ARGV[at + 3]) or nil
    local expires = kv_store(key, ARGV[at + 2], ttl, now, rev, n)
    reply[#reply + 1] = rev
    reply[#reply + 1] = expires and fmt(expires) or ''
    touched[#touched + 1] = key
    n = n + 1
  elseif live[at] then
    rev = rev or kv_next_revision()
    kv_remove(key, live[at], rev, n, 'delete')
    touched[#touched + 1] = key
    n = n + 1
  end
end
reply[2] = rev or kv_revision()
kv_wake(touched, now)
request_remember('kvreq', request, reply, now, request_ttl)
return reply
