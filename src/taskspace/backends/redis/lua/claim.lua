-- requires: _request.lua
-- ARGV: worker, n, request_id ('' = none), request_ttl, k (-1 = any name), k
-- names, queue... Leases up to n ready tasks: earlier queues first, then by
-- score (priority, then FIFO) across the ready sets of the wanted names, merged
-- here. Cost: O(names x n), whatever number of tasks of other names waits.
-- Every request id is remembered (with the tasks it leased, maybe none) for
-- request_ttl seconds (request_recall/request_remember, family 'claimreq'): a
-- repeat returns what the first call leased and never leases more, so neither
-- a retry nor a late duplicate leases to nobody.
local worker, n, request = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local request_ttl = ARGV[4]
local k = tonumber(ARGV[5])
local names = nil
if k >= 0 then
  names = {}
  for i = 1, k do names[i] = ARGV[5 + i] end
end
local first_queue = 6 + math.max(k, 0)
local out = {}
local now = clock()
if request ~= '' then
  -- The remembered grants: 'id\ttoken\n' per task leased.
  local granted = request_recall('claimreq', request, now)
  if granted then
    for id, token in string.gmatch(granted, '([^\n]+)\t([^\n]+)\n') do
      local f = redis.call('HMGET', tkey(id), unpack(FIELDS))
      if f[FIELD.state] == 'running' and f[FIELD.token] == token and f[FIELD.worker] == worker
      then
        out[#out + 1] = f
      end
    end
    return out
  end
end

-- The ids of the `want` best ready tasks of queue q over `wanted` names,
-- removed from their ready sets.
local function take(q, wanted, want, tidy)
  if #wanted == 1 then
    local popped = redis.call('ZPOPMIN', rkey(q, wanted[1]), want)
    local ids = {}
    for j = 1, #popped, 2 do ids[#ids + 1] = popped[j] end
    return ids
  end
  -- Each candidate: its score, id and ready set; each set: its key and how
  -- many of its members were taken.
  local cands, sets = {}, {}
  for _, name in ipairs(wanted) do
    local key = rkey(q, name)
    local head = redis.call('ZRANGE', key, 0, want - 1, 'WITHSCORES')
    if #head > 0 then
      local set = {key = key, taken = 0}
      sets[#sets + 1] = set
      for j = 1, #head, 2 do
        cands[#cands + 1] = {score = tonumber(head[j + 1]), id = head[j], set = set}
      end
    elseif tidy then
      redis.call('SREM', P .. 'qnames:' .. q, name)  -- re-added by the next enqueue
    end
  end
  if #sets > 1 then table.sort(cands, function(a, b) return a.score < b.score end) end
  local ids = {}
  for j = 1, math.min(want, #cands) do
    ids[j] = cands[j].id
    cands[j].set.taken = cands[j].set.taken + 1
  end
  -- The taken members of each set are its lowest-ranked ones.
  for _, set in ipairs(sets) do
    if set.taken > 0 then redis.call('ZREMRANGEBYRANK', set.key, 0, set.taken - 1) end
  end
  return ids
end

local started = fmt(wall())
promote(now)
local running = {}
local seen = {}
local granted = {}
for qi = first_queue, #ARGV do
  local q = ARGV[qi]
  if not seen[q] and #out < n then
    seen[q] = true
    local wanted = names or redis.call('SMEMBERS', P .. 'qnames:' .. q)
    local ids = take(q, wanted, n - #out, names == nil)
    local got = 0
    local token = #ids > 0 and next_tokens(#ids) - 1
    for _, id in ipairs(ids) do
      local tk = tkey(id)
      local f = redis.call('HMGET', tk, unpack(FIELDS))
      if f[FIELD.state] == 'queued' then
        token = token + 1
        got = got + 1
        local expires = fmt(now + tonumber(f[FIELD.lease_s]))
        local attempts = (tonumber(f[FIELD.attempts]) or 0) + 1
        local text = string.format('%d', token)
        redis.call('HSET', tk, 'state', 'running', 'token', text, 'worker', worker,
          'lease_expires', expires, 'started', started, 'attempts', attempts)
        f[FIELD.state], f[FIELD.attempts], f[FIELD.token] = 'running', attempts, text
        f[FIELD.worker], f[FIELD.lease_expires], f[FIELD.started] = worker, expires, started
        running[#running + 1] = expires
        running[#running + 1] = id
        out[#out + 1] = f
        granted[#granted + 1] = id .. '\t' .. text .. '\n'
      end
    end
    if got > 0 then
      count(q, 'queued', -got)
      count(q, 'running', got)
    end
  end
end
for i = 1, #running, 2000 do
  redis.call('ZADD', P .. 'running', unpack(running, i, math.min(i + 1999, #running)))
end
if request ~= '' then
  request_remember('claimreq', request, table.concat(granted), now, request_ttl)
end
return out
