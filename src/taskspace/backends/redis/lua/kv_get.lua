-- ARGV: keys. Per key {value, version, expires or ''}, or false if absent or
-- expired. Read-only (runs on the reads client): an expired key is skipped
-- here and removed by the next write.
local now = clock()
local out = {}
for i, key in ipairs(ARGV) do
  local rec = kv_read(key)
  if kv_is_live(rec, now) then out[i] = kv_reply(rec) else out[i] = false end
end
return out
