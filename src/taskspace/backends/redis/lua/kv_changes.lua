-- ARGV: prefix after_revision cursor('' = start after after_revision) limit
-- budget open_rev. Records due expiries first. {'compacted', revision,
-- compacted} if the feed dropped a change above after_revision; otherwise
-- {'ok', revision, cursor (last entry scanned), state, rows}: see
-- kv_scan_log (`limit` is what the caller's page still wants, `open_rev` the
-- revision of its last change so far).
local prefix, after, cursor = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = clock()
local touched = {}
kv_expire_due(now, KV_EXPIRE_STEP, touched)
kv_wake(touched, now)
local compacted = kv_compacted()
if after < compacted then return {'compacted', kv_revision(), compacted} end
if cursor == '' then cursor = string.format('%d', after) .. '-' .. '999999999' end
local rows, last, state = kv_scan_log(prefix, cursor, tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6])
return {'ok', kv_revision(), last, state, rows}
