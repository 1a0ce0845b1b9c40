-- ARGV: ids. If one of them has ended: its record (packed_record), or 1 if
-- it does not exist. Otherwise registers interest, so that finishing any of
-- them pushes to its done list, and returns 0.
for _, id in ipairs(ARGV) do
  local state = redis.call('HGET', tkey(id), 'state')
  if not state then return 1 end
  if not LIVE_STATES[state] then return packed_record(id) end
end
-- The count lives in the task's hash (field 'waiters'), so settling reads it
-- with the fields it reads anyway; settle() clears it.
for _, id in ipairs(ARGV) do redis.call('HINCRBY', tkey(id), 'waiters', 1) end
return 0
