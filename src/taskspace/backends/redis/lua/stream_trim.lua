-- ARGV: stream maxlen('' = none) min_id('' = none) max_age('' = none).
-- Drops entries beyond the maxlen newest, with an id below min_id, or
-- appended more than max_age seconds ago (wall clock; entries are visited
-- oldest first, STEP at a time, until one is young enough, at most
-- MAX_STEPS * STEP per call). Returns {how many were dropped, 1 if old
-- entries may remain (call again) else 0}.
local STEP, MAX_STEPS = 1000, 10
local key = stream_key(ARGV[1])
local steps = 0
local before = redis.call('XLEN', key)
if before == 0 then return {0, 0} end
if ARGV[2] ~= '' then redis.call('XTRIM', key, 'MAXLEN', '=', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('XTRIM', key, 'MINID', ARGV[3] .. '-0') end
if ARGV[4] ~= '' then
  local cutoff = wall() - tonumber(ARGV[4])
  local keep_from = nil
  local start = '-'
  while not keep_from do
    local batch = redis.call('XRANGE', key, start, '+', 'COUNT', STEP)
    if #batch == 0 then break end
    steps = steps + 1
    if steps > MAX_STEPS then
      keep_from = batch[1][1]
      break
    end
    for _, entry in ipairs(batch) do
      local f = {}
      for j = 1, #entry[2], 2 do f[entry[2][j]] = entry[2][j + 1] end
      if tonumber(f.t) >= cutoff then
        keep_from = entry[1]
        break
      end
      start = '(' .. entry[1]
    end
    if #batch < STEP and not keep_from then break end
  end
  if keep_from then
    redis.call('XTRIM', key, 'MINID', keep_from)
  else
    redis.call('XTRIM', key, 'MAXLEN', '=', 0)
  end
end
return {before - redis.call('XLEN', key), steps > MAX_STEPS and 1 or 0}
