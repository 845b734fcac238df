-- acquire: admission when the caller's snapshot is not plainly CLOSED.
-- KEYS, ARGV[1..6]: see _lib.lua.
-- ARGV[7]  lease id to use if a half-open probe permit is granted
-- Returns: the common reply; decision 0 = rejected, 1 = admitted, 2 = admitted as a probe
--          holding lease ARGV[7]. OPEN turns HALF_OPEN here once open_until_ms has passed.

local function main()
  local S = load()
  local lease = ARGV[7]

  if S.forced == 'open' then return reply(0, S, -1, -1) end
  if S.forced == 'closed' or S.state == 'closed' then
    return reply(1, S, 0, -1)
  end

  if S.state == 'open' then
    if NOW < S.open_until then return reply(0, S, S.open_until - NOW, -1) end
    transition(S, 'half_open')
    save(S)
    publish(S, 't')
  end

  -- half_open: at most homax leases alive at once across the fleet
  local n, first = probes_active()
  if n < CFG.homax then
    redis.call('ZADD', K_PROBES, NOW + CFG.lease, lease)
    redis.call('PEXPIRE', K_PROBES, CFG.ttl)
    save(S)
    return reply(2, S, 0, CFG.homax - n - 1)
  end
  save(S)
  return reply(0, S, math.max(first - NOW, 1), 0)
end

return run(main, KEYS_IN, ARGV_IN)
