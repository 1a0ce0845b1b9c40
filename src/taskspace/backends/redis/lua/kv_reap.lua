-- ARGV: limit keep step. Records the expiry of up to `limit` keys whose TTL
-- passed, then compacts the change feed towards its newest `keep` entries
-- (at most `step` entries per call, or one whole revision larger than that;
-- a revision is never split: its entries go together or stay together).
-- Returns how many keys expired.
local limit, keep, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = clock()
local touched = {}
local expired = kv_expire_due(now, limit, touched)
kv_wake(touched, now)
local log = P .. 'kvlog'
local excess = redis.call('XLEN', log) - keep
if excess > 0 then
  local take = math.min(excess, step)
  local batch = redis.call('XRANGE', log, '-', '+', 'COUNT', take + 1)
  local function rev_of(entry) return tonumber(string.match(entry[1], '^(%d+)')) end
  local keep_from = rev_of(batch[take + 1])
  local dropped = nil
  for i = take, 1, -1 do
    if rev_of(batch[i]) < keep_from then
      dropped = rev_of(batch[i])
      break
    end
  end
  if not dropped and take < excess then
    -- The `take` oldest entries are all of one revision, larger than `step`:
    -- that whole revision goes (its entries are <rev>-0 .. <rev>-<last>), if
    -- all of it lies past the newest `keep`, so compaction always progresses.
    local oldest = rev_of(batch[1])
    local id = string.format('%d', oldest)
    local tail = redis.call('XREVRANGE', log, id, id, 'COUNT', 1)  -- its last entry
    local size = tonumber(string.match(tail[1][1], '-(%d+)$')) + 1
    if size <= excess then
      keep_from = oldest + 1
      dropped = oldest
    end
  end
  if dropped then
    redis.call('XTRIM', log, 'MINID', string.format('%d', keep_from) .. '-0')
    redis.call('SET', P .. 'kvcompact', string.format('%d', dropped))
  end
end
return expired
