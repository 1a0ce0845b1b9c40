-- ARGV: prefix after_key('' = from the prefix; else a key sorting at or after
-- the prefix) limit. Live {key, value,
-- version, expires or ''} in key order, at most `limit`; reads at most
-- 4 * limit index entries, then returns what it has and the last key read as
-- a cursor ({rows, cursor or ''}). Read-only.
local prefix, after, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local low = '[' .. prefix
if after ~= '' then low = '(' .. after end  -- the caller passes '' unless after >= prefix
local high = '+'
if prefix ~= '' then high = '[' .. prefix .. '\255' end
local now = clock()
local keys = redis.call('ZRANGEBYLEX', P .. 'kvidx', low, high, 'LIMIT', 0, 4 * limit)
local out, cursor = {}, ''
for _, key in ipairs(keys) do
  if #out >= limit then break end
  cursor = key
  local rec = kv_read(key)
  if kv_is_live(rec, now) then
    local row = kv_reply(rec)
    table.insert(row, 1, key)
    out[#out + 1] = row
  end
end
if #out >= limit or #keys < 4 * limit then cursor = '' end
return {out, cursor}
