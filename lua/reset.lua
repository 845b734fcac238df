-- reset: back to CLOSED with counters, window, probes and override cleared.
-- KEYS, ARGV[1..6]: see _lib.lua.
-- Returns: the common reply; decision 1. The generation is bumped, so outcomes of calls
--          admitted before the reset do not count; the reset is always published.

local function main()
  local S = load()
  local before = effective(S.state, S.forced)
  transition(S, 'closed')
  S.forced = ''
  S.reopen = 0
  if before == 'closed' then S.from = '' else S.from = before end
  save(S)
  publish(S, 'r')
  return reply(1, S, 0, -1)
end

return run(main, KEYS_IN, ARGV_IN)
