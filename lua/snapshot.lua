-- snapshot: read-only view of one breaker, for refreshes, metrics and the CLI.
-- KEYS, ARGV[1..6]: see _lib.lua. Writes nothing.
-- Returns: the common reply (decision = 1 if the key exists, else 0; window totals as of
--          now), followed by 15 half_open_successes 16 reopen_count 17 opened_at_ms
--          18 updated_at_ms 19 config_fingerprint 20 active probe leases.

local function main()
  local S = load()
  local exists = 1
  if S.new then exists = 0 end
  local W = window_view()
  local free, active, first = -1, 0, 0
  -- garbage leases (beyond the longest possible one) are not active; acquire drops them
  local ok, n = pcall(redis.call, 'ZCOUNT', K_PROBES, '(' .. NOW, NOW + MAX_LEASE_MS)
  if ok then active = n end
  if S.state == 'half_open' then free = math.max(CFG.homax - active, 0) end
  local retry = 0
  if S.forced == 'open' then
    retry = -1
  elseif S.forced == '' and S.state == 'open' then
    retry = math.max(S.open_until - NOW, 0)
  end
  local r = reply(exists, S, retry, free, W)
  local extra = redis.call('HMGET', K_STATE, 'opened_at_ms', 'updated_at_ms', 'config_fingerprint')
  r[15] = S.hs
  r[16] = S.reopen
  r[17] = num(extra[1], 0)
  r[18] = num(extra[2], 0)
  r[19] = extra[3] or ''
  r[20] = active
  return r
end

return run(main, KEYS_IN, ARGV_IN)
