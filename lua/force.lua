-- force: set or clear the fleet-wide operator override.
-- KEYS, ARGV[1..6]: see _lib.lua.
-- ARGV[7]  'open', 'closed', or '' to release the override
-- Returns: the common reply; decision 1 if the override changed, 0 if it already was so.
-- A change bumps the generation (outcomes of calls admitted before it no longer count),
-- clears counters, window and probes, and is published whether or not the effective state
-- changes, so every process picks up the new generation.

local function main()
  local S = load()
  local mode = ARGV[7]
  if mode ~= 'open' and mode ~= 'closed' and mode ~= '' then
    return redis.error_reply('force mode must be open, closed or empty, got ' .. tostring(mode))
  end
  if S.forced == mode then
    return reply(0, S, 0, -1)
  end
  local before = effective(S.state, S.forced)
  -- transition() with the underlying state kept: only the override moves.
  transition(S, S.state, 0)
  S.forced = mode
  if before == effective(S.state, S.forced) then S.from = '' else S.from = before end
  save(S)
  publish(S, 'f')
  local retry = 0
  if mode == 'open' then retry = -1 end
  return reply(1, S, retry, -1)
end

return run(main, KEYS_IN, ARGV_IN)
