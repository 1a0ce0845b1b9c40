-- ARGV: state, queue, name ('' = any), limit, after_seq, budget. Tasks after
-- after_seq in submission order matching every filter, at most `limit`, among
-- at most `budget` index entries. Returns {rows (FIELDS without payload and
-- result), last seq scanned or false when the index is exhausted}.
local state, queue, name = ARGV[1], ARGV[2], ARGV[3]
local limit, after, budget = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local fields = {}
for i, field in ipairs(FIELDS) do
  fields[i] = (field == 'payload' or field == 'result') and '-' or field
end
local rows = redis.call('ZRANGEBYSCORE', P .. 'idx', '(' .. after, '+inf', 'WITHSCORES',
  'LIMIT', 0, budget)
local out = {}
for j = 1, #rows, 2 do
  local f = redis.call('HMGET', tkey(rows[j]), unpack(fields))
  if f[FIELD.id] and (state == '' or f[FIELD.state] == state)
      and (queue == '' or f[FIELD.queue] == queue) and (name == '' or f[FIELD.name] == name) then
    out[#out + 1] = f
    if #out >= limit then return {out, rows[j + 1]} end
  end
end
if #rows < 2 * budget then return {out, false} end
return {out, rows[#rows]}
