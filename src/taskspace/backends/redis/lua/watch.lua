-- ARGV: ids. 1 if one of them has ended (or does not exist); otherwise
-- registers interest, so that finishing any of them pushes to its done list.
for _, id in ipairs(ARGV) do
  local state = redis.call('HGET', tkey(id), 'state')
  if not state or (state ~= 'queued' and state ~= 'running') then return 1 end
end
for _, id in ipairs(ARGV) do
  redis.call('INCR', P .. 'waiting:' .. id)
  redis.call('EXPIRE', P .. 'waiting:' .. id, 300)
end
return 0
