return promote(clock())
