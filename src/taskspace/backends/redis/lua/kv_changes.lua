-- ARGV: prefix after_revision cursor('' = start after after_revision) limit
-- budget. Records due expiries first. {'compacted', revision, compacted} if
-- the feed dropped a change above after_revision; otherwise {'ok', revision,
-- cursor (last entry scanned), done (1: reached the end), rows}.
local prefix, after, cursor = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = clock()
local touched = {}
kv_expire_due(now, KV_EXPIRE_STEP, touched)
kv_wake(touched, now)
local compacted = kv_compacted()
if after < compacted then return {'compacted', kv_revision(), compacted} end
if cursor == '' then cursor = string.format('%d', after) .. '-' .. '999999999' end
local rows, last, done = kv_scan_log(prefix, cursor, tonumber(ARGV[4]), tonumber(ARGV[5]))
return {'ok', kv_revision(), last, done and 1 or 0, rows}
