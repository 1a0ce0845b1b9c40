-- requires: _request.lua
-- Streams (library of the stream_* scripts). Keys under P:
--   s:<stream>      a Redis stream; entry id <n>-0, fields d (data), t (wall clock).
--   sid:<stream>    the last id handed out (see stream_next_ids), so ids are never
--                   reused after a trim.
--   sreq, sreqexp   request id -> remembered reply (JSON), and -> expiry.

local function stream_key(stream) return P .. 's:' .. stream end

-- The first of the next n ids of `stream` (the n are consecutive): above every
-- id handed out before and never below the server's wall clock in
-- microseconds (the fencing tokens' rule, base.next_token), so a counter that
-- lost its last appends (a failover to a replica that missed them) still
-- restarts above every id handed out before. Ids are therefore not dense;
-- they stay below 2^53 (exact in a Lua number) until the year 2255.
local function stream_next_ids(stream, n)
  return next_ids(P .. 'sid:' .. stream, n)
end

