-- ARGV: ids. 1 if one of them has ended (or does not exist); otherwise
-- registers interest, so that finishing any of them pushes to its done list.
for _, id in ipairs(ARGV) do
  local state = redis.call('HGET', tkey(id), 'state')
  if not state or (state ~= 'queued' and state ~= 'running') then return 1 end
end
-- The count lives in the task's hash (field 'waiters'), so settling reads it
-- with the fields it reads anyway; settle() clears it.
for _, id in ipairs(ARGV) do redis.call('HINCRBY', tkey(id), 'waiters', 1) end
return 0
