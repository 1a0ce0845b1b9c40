-- ARGV: prefix after_revision cursor('' = start after after_revision) budget
-- timeout waiter_id. Records due expiries first. {'now'}: a change of the prefix above
-- after_revision exists (or the feed was compacted past it); {'more',
-- cursor}: `budget` entries scanned without a match, call again from cursor;
-- {'wait', cursor, seconds to the earliest expiry or ''}: none yet, and the
-- waiter is registered (in kvwaiters, woken through kvw:<waiter_id>) for
-- `timeout` seconds.
local prefix, after, cursor = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = clock()
local touched = {}
kv_expire_due(now, KV_EXPIRE_STEP, touched)
kv_wake(touched, now)
if after < kv_compacted() then return {'now'} end
if cursor == '' then cursor = string.format('%d', after) .. '-' .. '999999999' end
local rows, last, state = kv_scan_log(prefix, cursor, 1, tonumber(ARGV[4]), '')
if #rows > 0 then return {'now'} end
if state == 'more' then return {'more', last} end
local z = P .. 'kvwaiters'
local timeout = tonumber(ARGV[5])
redis.call('ZADD', z, now + timeout + 1, ARGV[6] .. '\n' .. prefix)
local ms = math.ceil(timeout * 1000) + 1000
if redis.call('PTTL', z) < ms then redis.call('PEXPIRE', z, ms) end
-- The earliest expiry of a key of the prefix among the EXPIRY_LOOK soonest
-- (past those, the last one looked at: the wait re-checks then).
local EXPIRY_LOOK = 100
local soon = redis.call('ZRANGE', P .. 'kvexp', 0, EXPIRY_LOOK - 1, 'WITHSCORES')
local at = nil
for i = 1, #soon, 2 do
  if string.sub(soon[i], 1, #prefix) == prefix then
    at = tonumber(soon[i + 1])
    break
  end
end
if not at and #soon == 2 * EXPIRY_LOOK then at = tonumber(soon[#soon]) end
local until_expiry = ''
if at then until_expiry = fmt(math.max(at - now, 0.001)) end
return {'wait', last, until_expiry}
