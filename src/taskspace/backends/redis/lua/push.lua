-- ARGV: PUSH_N fields per task (see push_tasks in common.lua). Returns the id
-- of each task. The client splits large batches into several calls
-- (atomicity is per call), so that no call blocks Redis for long.
local starts = {}
for i = 1, #ARGV, PUSH_N do starts[#starts + 1] = i end
local woken = {}
local out = push_tasks(ARGV, starts, clock(), wall(), woken)
wake(woken)
return out
