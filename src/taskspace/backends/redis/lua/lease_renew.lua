-- ARGV: ttl, then name id token per grant. Per grant its new expiry, or false if lost.
local now = clock()
local expires = now + tonumber(ARGV[1])
local out = {}
local touched = {}
for i = 2, #ARGV, 3 do
  local name, id, token = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local g = grant_read(name, id)
  if g and g.token == token and g.expires > now then
    g.expires = expires
    grant_write(name, g, now)
    touched[name] = true
    out[#out + 1] = fmt(expires)
  else
    out[#out + 1] = false
  end
end
for name in pairs(touched) do lease_cap_expire(name, now) end
return out
