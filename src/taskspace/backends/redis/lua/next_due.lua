-- ARGV: k (-1 = any name), k names, queues. Returns {due, wake keys}: due is
-- '0' if a task of a wanted name is claimable now, else seconds until the next
-- delayed task falls due, or '-1' if none is delayed; the keys are the wake
-- lists to block on.
local now = clock()
promote(now)
local k = tonumber(ARGV[1])
local keys = {}
local ready = false
for qi = 2 + math.max(k, 0), #ARGV do
  local q = ARGV[qi]
  local names
  if k >= 0 then
    names = {}
    for i = 1, k do names[i] = ARGV[1 + i] end
  else
    names = redis.call('SMEMBERS', P .. 'qnames:' .. q)
    keys[#keys + 1] = P .. 'wake:' .. q
  end
  for _, name in ipairs(names) do
    if k >= 0 then keys[#keys + 1] = P .. 'wake:' .. q .. '\n' .. name end
    if not ready and redis.call('ZCARD', rkey(q, name)) > 0 then ready = true end
  end
end
if ready then return {'0', keys} end
local first = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')
if #first == 0 then return {'-1', keys} end
return {fmt(math.max(tonumber(first[2]) - now, 0.001)), keys}
