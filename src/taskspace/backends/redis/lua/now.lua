-- The lease clock (see clock() in common.lua) as text.
return fmt(clock())
