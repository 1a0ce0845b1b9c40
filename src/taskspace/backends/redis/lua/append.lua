-- ARGV: stream data maxlen('' = none). The new entry's id.
local id = redis.call('INCR', P .. 'sid:' .. ARGV[1])
local key = P .. 's:' .. ARGV[1]
local entry = string.format('%d-0', id)
if ARGV[3] ~= '' then
  redis.call('XADD', key, 'MAXLEN', '=', ARGV[3], entry, 'd', ARGV[2], 't', fmt(clock()))
else
  redis.call('XADD', key, entry, 'd', ARGV[2], 't', fmt(clock()))
end
return id
