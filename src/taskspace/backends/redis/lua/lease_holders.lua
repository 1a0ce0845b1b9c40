-- ARGV: name. Flat list holder, token, expires of live grants.
local now = clock()
local z, h = P .. 'lease:' .. ARGV[1], P .. 'leasetok:' .. ARGV[1]
local live = redis.call('ZRANGEBYSCORE', z, '(' .. now, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = redis.call('HGET', h, live[i])
  out[#out + 1] = live[i + 1]
end
return out
