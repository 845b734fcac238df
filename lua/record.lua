-- record: apply an ordered batch of outcomes and evaluate the trip / close rules.
-- KEYS, ARGV[1..6]: see _lib.lua.
-- ARGV[7]  '' : ARGV[8..] are groups of four per outcome:
--                 generation it was admitted under; code (0 ok, 1 failed, 2 slow ok,
--                 3 slow failed, 4 no outcome: only give the lease back); lease id or '';
--                 retry_after_ms from the provider (0 = none), the open period if it trips
--                 (one outcome: ARGV[8] generation, ARGV[9] code, ARGV[10] lease, ARGV[11])
--          'c': the same, and the short reply also carries the window counts
--          'r': ARGV[8] is a batch of outcomes without leases, as runs of equal ones:
--               'gen,code,retry_after_ms,count;...' (batched mode: one short argument
--               instead of four per outcome); the short reply carries the window counts
-- Returns: the common reply; decision = how many outcomes counted (the rest were stale:
--          older generation, override active, or no outcome). When the breaker is still
--          plainly CLOSED (no transition, no override, no lease returned, nothing repaired)
--          only {counted, generation, now_ms}, or with ARGV[7] = 'c' or 'r'
--          {counted, generation, now_ms, window calls, failures, slow, consecutive_failures}.
-- An outcome of an older generation never drives a transition.

local function int_ok(raw)
  -- as load() accepts a stored number: absent, or a non-negative integer below 2^53
  if raw == false or raw == nil then return true end
  local n = tonumber(raw)
  return n ~= nil and n >= 0 and n == math.floor(n) and n < 2 ^ 53
end

-- The common call, lean: one success, no lease, plainly CLOSED (no override, no failure
-- run to reset, the state hash fresh enough not to be rewritten), a time window whose
-- current bucket is the newest. It writes what the full path below would (the window's
-- total and bucket calls) with a fraction of its work; anything else, or anything odd
-- (garbage to repair included), takes the full path, with the state it read if it read
-- it in full: returns (reply) or (nil, state fields or nil).
local function lean()
  if ARGV[7] ~= '' or #ARGV ~= 11 or ARGV[9] ~= '0' or ARGV[10] ~= '' or CFG.count then
    return nil, nil
  end
  local ok, v = read_state()
  if not ok then return nil, nil end  -- the full path repairs it
  if v[1] ~= 'closed' or v[2] ~= ARGV[8] or v[4] ~= '0' or v[7] ~= '' then
    return nil, v
  end
  for i = 2, 6 do
    if not int_ok(v[i]) then return nil, v end
  end
  local updated = tonumber(v[8])
  if updated == nil or NOW - updated >= CFG.ttl / 8 then return nil, v end
  local ep = math.floor(NOW / CFG.bw)
  local i = ep % CFG.wn
  local w
  ok, w = pcall(redis.call, 'HMGET', K_WIN, 'e', 'k', 'c', 'f', 's', 'c' .. i)
  if not ok or tonumber(w[1]) ~= ep or w[2] ~= WTAG then return nil, v end
  local c, f, sl, bc = tonumber(w[3]), tonumber(w[4]), tonumber(w[5]), num(w[6], 0)
  if c == nil or f == nil or sl == nil or c < 0 or f < 0 or sl < 0 or f > c or sl > c then
    return nil, v
  end
  redis.call('HSET', K_WIN, 'c', c + 1, 'c' .. i, bc + 1)
  return {1, tonumber(v[2]), NOW}
end

local function main()
  local fast, state = lean()
  if fast then return fast end
  local S = load(state)
  local W
  local counted = 0
  local freed = false

  local function apply(gen, code, lease, ra)
    if lease ~= '' and lease ~= nil then
      local ok, r = pcall(redis.call, 'ZREM', K_PROBES, lease)
      if ok and r == 1 then freed = true end
    end
    if code ~= 4 and gen == S.gen and S.forced == '' and S.state ~= 'open' then
      counted = counted + 1
      local failed = code == 1 or code == 3
      local slow = code >= 2
      if S.state == 'closed' then
        if not W then W = window_open() end
        window_push(W, failed, slow, 1)
        if failed then
          S.cf = S.cf + 1
          S.dirty = true
        elseif S.cf ~= 0 then
          S.cf = 0
          S.dirty = true
        end
        if (failed and S.cf >= CFG.ft)
            or (W.c >= CFG.minc and ((failed and W.f >= CFG.frt * W.c)
                                     or (slow and W.s >= CFG.srt * W.c))) then
          local open_ms = CFG.rt
          if failed and ra > 0 then open_ms = math.min(ra, CFG.maxrt) end
          S.reopen = 0
          transition(S, 'open', open_ms)
          W = nil
        end
      else -- half_open
        if failed then
          local open_ms
          if ra > 0 then open_ms = math.min(ra, CFG.maxrt) else open_ms = backoff_ms(S.reopen + 1) end
          S.reopen = S.reopen + 1
          transition(S, 'open', open_ms)
        else
          S.hs = S.hs + 1
          S.dirty = true
          if S.hs >= CFG.st then transition(S, 'closed') end
        end
      end
    end
  end

  local mode = ARGV[7]
  if mode == 'r' then
    for g, c, r, n in string.gmatch(ARGV[8] or '', '(%d+),(%d+),(%d+),(%d+)') do
      g, c, r = tonumber(g), tonumber(c), tonumber(r)
      n = tonumber(n)
      if c == 0 and n > 0 and g == S.gen and S.forced == '' and S.state == 'closed' then
        -- plain successes: they cannot trip a rule, so they go in at once
        if not W then W = window_open() end
        window_push(W, false, false, n)
        counted = counted + n
        if S.cf ~= 0 then
          S.cf = 0
          S.dirty = true
        end
      else
        for _ = 1, n do apply(g, c, '', r) end
      end
    end
  else
    for a = 8, #ARGV, 4 do
      apply(tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2], num(ARGV[a + 3], 0))
    end
  end

  if W then window_close(W) end
  save(S)
  if S.from ~= '' then
    publish(S, 't')
  elseif freed and S.state == 'half_open' and S.forced == '' then
    publish(S, 'p')
  end
  if S.from == '' and NOTE == '' and S.state == 'closed' and S.forced == '' and not freed then
    if mode ~= 'c' and mode ~= 'r' then
      return {counted, S.gen, NOW}  -- the common case: still plainly CLOSED, nothing else to say
    end
    if not W then W = window_view() end
    return {counted, S.gen, NOW, W.c, W.f, W.s, S.cf}
  end
  local free = -1
  if S.state == 'half_open' and freed then free = 1 end
  return reply(counted, S, 0, free, W)
end

return run(main, KEYS_IN, ARGV_IN)
