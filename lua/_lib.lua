-- distbreaker shared library, prepended to every script by distbreaker/_scripts.py.
--
-- Every script takes the same KEYS and the same first six ARGV:
--   KEYS[1]  distbreaker:v1:{<name>}          HASH  breaker state
--   KEYS[2]  distbreaker:v1:{<name>}:window   HASH  sliding window
--   KEYS[3]  distbreaker:v1:{<name>}:probes   ZSET  half-open probe leases (score = expiry ms)
--   KEYS[4]  distbreaker:v1:seq  HASH  the prefix's message sequence (field n) and epoch (e);
--            optional: a Cluster client leaves it out (it lives in another slot)
--   ARGV[1]  config: ft,rt_ms,st,frt,minc,count,wn,bucket_ms,srt,homax,maxrt_ms,mult,jitter,lease_ms,ttl_ms
--   ARGV[2]  config fingerprint (stored with the state to detect drift)
--   ARGV[3]  pub/sub channel for transition messages
--   ARGV[4]  '<origin> <breaker name>' (only copied into messages; origin identifies the
--            breaker object that made the call, so it can tell its own messages)
--   ARGV[5]  a random number in [0, 1) from the client, for backoff jitter
--   ARGV[6]  '' (use Redis TIME) or a time in ms; only the test suite sets it
-- and returns the same reply array (see reply() below); snapshot.lua appends more fields.

-- Per-call values, set by begin(): the same file runs as an EVAL script (begin is called
-- with the KEYS and ARGV globals) and as a Redis Function library (loaded once; each
-- function calls begin with its keys and args), so nothing below reads those globals.
local KEYS, ARGV
local K_STATE, K_WIN, K_PROBES, K_SEQ, CFG, FP, CHANNEL, NAME, RND, NOW, NOTE, WTAG

local function num(v, d)
  v = tonumber(v)
  if v == nil or v ~= v then return d end
  return v
end

local CFG_PATTERN  -- built on first use: a library's load step may not touch `string`

local function parse_cfg(s)
  if CFG_PATTERN == nil then
    CFG_PATTERN = '^' .. string.rep('([^,]*),', 14) .. '([^,]*)$'
  end
  -- one match with 15 captures: cheaper than iterating
  local c = {string.match(s, CFG_PATTERN)}
  for i = 1, 15 do c[i] = tonumber(c[i]) end
  local cfg = {ft = c[1], rt = c[2], st = c[3], frt = c[4], minc = c[5], count = c[6] == 1,
               wn = c[7], bw = c[8], srt = c[9], homax = c[10], maxrt = c[11], mult = c[12],
               jitter = c[13], lease = c[14], ttl = c[15]}
  -- tags a window with the shape it was built for; a window of another shape starts over
  cfg.wtag = (cfg.count and 'c' or 't') .. cfg.wn .. ':' .. cfg.bw
  return cfg
end

-- Parsed configs, by config string. A Function library keeps this between calls (a
-- fleet has a handful of configs); an EVAL script starts with it empty every time.
local CFG_CACHE, CFG_CACHED = {}, 0

local function begin(keys, argv)
  KEYS, ARGV = keys, argv
  K_STATE, K_WIN, K_PROBES, K_SEQ = keys[1], keys[2], keys[3], keys[4]
  CFG = CFG_CACHE[argv[1]]
  if CFG == nil then
    CFG = parse_cfg(argv[1])
    if CFG_CACHED >= 256 then CFG_CACHE, CFG_CACHED = {}, 0 end
    CFG_CACHE[argv[1]], CFG_CACHED = CFG, CFG_CACHED + 1
  end
  WTAG = CFG.wtag
  FP, CHANNEL, NAME, RND = argv[2], argv[3], argv[4], num(argv[5], 0.5)
  if argv[6] ~= nil and argv[6] ~= '' then
    NOW = tonumber(argv[6])
  else
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  NOTE = ''
end

local function repair(why)
  -- Garbage in our keys must never reach a caller: drop what cannot be read, say so
  -- (briefly: a garbage value can be megabytes).
  if #why > 120 then why = string.sub(why, 1, 120) .. '...(' .. #why .. ' bytes)' end
  if NOTE == '' then NOTE = why elseif #NOTE < 1000 then NOTE = NOTE .. ';' .. why end
end

local STATES = {closed = true, open = true, half_open = true}
local FORCED = {[''] = true, open = true, closed = true}

-- The state hash's fields, in the order load() reads them.
local function read_state()
  return pcall(redis.call, 'HMGET', K_STATE, 'state', 'generation', 'open_until_ms',
    'consecutive_failures', 'half_open_successes', 'reopen_count', 'forced', 'updated_at_ms',
    'config_fingerprint')
end

-- S: the state hash as a table; S.dirty marks that it must be written back. `pre`: the
-- reply of a read_state() already made in this call (record.lua's lean path).
local function load(pre)
  local ok, v = true, pre
  if v == nil then ok, v = read_state() end
  if not ok then
    redis.call('DEL', K_STATE, K_WIN, K_PROBES)
    repair('state key had the wrong type')
    v = {}
  end
  local S = {state = v[1], gen = num(v[2], 0), open_until = num(v[3], 0), cf = num(v[4], 0),
             hs = num(v[5], 0), reopen = num(v[6], 0), forced = v[7] or '',
             updated = num(v[8], 0), fp = v[9] or '', dirty = false, from = ''}
  if S.state == nil or S.state == false then
    S.state = 'closed'
    S.new = true
    S.dirty = true
  elseif not STATES[S.state] then
    repair('unknown state ' .. tostring(S.state))
    S.state = 'closed'
    S.dirty = true
  end
  if not FORCED[S.forced] then
    repair('unknown override ' .. tostring(S.forced))
    S.forced = ''
    S.dirty = true
  end
  local numeric = {'gen', 'open_until', 'cf', 'hs', 'reopen'}
  for i, f in ipairs(numeric) do
    local raw = v[i + 1]
    if (raw and tonumber(raw) == nil) or S[f] < 0 or S[f] ~= math.floor(S[f])
        or S[f] >= 2 ^ 53 then
      repair('bad field ' .. f .. '=' .. tostring(raw))
      S[f] = 0
      S.dirty = true
    end
  end
  return S
end

-- Runs an operation; if one of our keys holds the wrong type (garbage written by hand),
-- deletes the breaker's keys and runs it again on a fresh breaker.
local function run(main, keys, argv)
  begin(keys, argv)
  local ok, res = pcall(main)
  if ok then return res end
  local msg = res
  if type(res) == 'table' then msg = res.err or res[1] end
  msg = tostring(msg)
  if string.find(msg, 'WRONGTYPE', 1, true) then
    redis.call('DEL', K_STATE, K_WIN, K_PROBES)
    repair('a key had the wrong type')
    return main()
  end
  return redis.error_reply(msg)
end

local function effective(state, forced)
  if forced ~= '' then return forced end
  return state
end

-- Rewrites every field (one HSET) and refreshes the TTL of state and window. An empty
-- fingerprint (the operator CLI) keeps the stored one; a different one marks drift.
local function save(S)
  if not S.dirty and NOW - S.updated < CFG.ttl / 8 then return end
  local fp = FP
  if fp == '' then fp = S.fp end
  redis.call('HSET', K_STATE, 'state', S.state, 'generation', S.gen,
    'open_until_ms', S.open_until, 'consecutive_failures', S.cf,
    'half_open_successes', S.hs, 'reopen_count', S.reopen, 'forced', S.forced,
    'config_fingerprint', fp, 'updated_at_ms', NOW)
  if FP ~= '' and S.fp ~= '' and S.fp ~= FP then
    redis.call('HSET', K_STATE, 'config_drift_at_ms', NOW, 'config_fingerprint_other', S.fp)
  end
  if S.opened_at then redis.call('HSET', K_STATE, 'opened_at_ms', S.opened_at) end
  redis.call('PEXPIRE', K_STATE, CFG.ttl)
  redis.call('PEXPIRE', K_WIN, CFG.ttl)
end

-- Every transition goes through here: bumps the generation, clears what belonged to the
-- old one (window, probes, counters), and remembers the effective state it left.
local function transition(S, to, open_ms)
  if S.from == '' then S.from = effective(S.state, S.forced) end
  S.state = to
  S.gen = S.gen + 1
  S.cf = 0
  S.hs = 0
  if to == 'open' then
    S.opened_at = NOW
    S.open_until = NOW + open_ms
  elseif to == 'closed' then
    S.reopen = 0
    S.open_until = 0
  end
  S.dirty = true
  S.cleared = true
  redis.call('DEL', K_WIN, K_PROBES)
end

-- How long to stay open on a reopen from half-open: exponential backoff, capped, jittered.
local function backoff_ms(reopen)
  local d = CFG.rt * (CFG.mult ^ reopen)
  if d > CFG.maxrt then d = CFG.maxrt end
  d = d * (1 + CFG.jitter * (2 * RND - 1))
  if d > CFG.maxrt then d = CFG.maxrt end
  if d < 1 then d = 1 end
  return math.floor(d)
end

local function publish(S, event)
  -- "v1 <event> <from> <to> <generation> <open_until_ms> <now_ms> <forced|-> <seq|->
  --  <origin|-> <name>". seq numbers the prefix's messages, so a listener can tell that
  -- it missed one; garbage in that key (or an ACL without it) costs only the number.
  local to = effective(S.state, S.forced)
  local from = S.from
  if from == '' then from = to end
  local f = S.forced
  if f == '' then f = '-' end
  local seq = '-'
  if K_SEQ then
    local n = redis.pcall('HINCRBY', K_SEQ, 'n', 1)
    if type(n) == 'number' then seq = n end
  end
  local sender = NAME
  if not string.find(sender, ' ', 1, true) then sender = '- ' .. sender end
  redis.call('PUBLISH', CHANNEL, 'v1 ' .. event .. ' ' .. from .. ' ' .. to .. ' ' .. S.gen ..
    ' ' .. S.open_until .. ' ' .. NOW .. ' ' .. f .. ' ' .. seq .. ' ' .. sender)
end

-- Time window: CFG.wn buckets of CFG.bw ms; fields e (newest bucket epoch), c f s (totals),
-- c<i> f<i> s<i> (bucket i). Buckets that fell out are subtracted (and, when write is set,
-- deleted) before use, so the totals always cover the last wn buckets.
local function window_time(write)
  local ep = math.floor(NOW / CFG.bw)
  local i = ep % CFG.wn
  local w = redis.call('HMGET', K_WIN, 'e', 'c', 'f', 's', 'c' .. i, 'f' .. i, 's' .. i, 'k')
  local last = tonumber(w[1])
  local W = {c = num(w[2], 0), f = num(w[3], 0), s = num(w[4], 0), bc = num(w[5], 0),
             bf = num(w[6], 0), bs = num(w[7], 0), ep = ep, i = i}
  if w[8] ~= WTAG then last = nil end
  if last == nil or ep - last >= CFG.wn or last - ep >= CFG.wn
      or W.c < 0 or W.f < 0 or W.s < 0 or W.f > W.c or W.s > W.c then
    if last ~= nil and (W.c < 0 or W.f > W.c or W.s > W.c) then repair('bad window totals') end
    if write and w[1] then redis.call('DEL', K_WIN) end
    W.c, W.f, W.s, W.bc, W.bf, W.bs, W.fresh = 0, 0, 0, 0, 0, 0, true
    return W
  end
  if ep < last then
    -- Server clock stepped back: keep counting in the newest bucket.
    W.ep, W.i = last, last % CFG.wn
    if W.i ~= i then
      local b = redis.call('HMGET', K_WIN, 'c' .. W.i, 'f' .. W.i, 's' .. W.i)
      W.bc, W.bf, W.bs = num(b[1], 0), num(b[2], 0), num(b[3], 0)
    end
    return W
  end
  local del = {}
  for k = last + 1, ep do
    local j = k % CFG.wn
    local oc, of, os
    if j == i then
      oc, of, os = W.bc, W.bf, W.bs
      W.bc, W.bf, W.bs = 0, 0, 0
    else
      local b = redis.call('HMGET', K_WIN, 'c' .. j, 'f' .. j, 's' .. j)
      oc, of, os = num(b[1], 0), num(b[2], 0), num(b[3], 0)
      if b[1] then del[#del + 1] = 'c' .. j; del[#del + 1] = 'f' .. j; del[#del + 1] = 's' .. j end
    end
    W.c, W.f, W.s = W.c - oc, W.f - of, W.s - os
  end
  if W.c < 0 or W.f < 0 or W.s < 0 then
    repair('bad window buckets')
    if write then redis.call('DEL', K_WIN) end
    W.c, W.f, W.s, W.bc, W.bf, W.bs, W.fresh = 0, 0, 0, 0, 0, 0, true
    return W
  end
  if write and #del > 0 then redis.call('HDEL', K_WIN, unpack(del)) end
  return W
end

-- Count window: a ring of CFG.wn slots; fields n (filled), h (next slot), f s (totals),
-- and one field per slot holding 0 ok, 1 failed, 2 slow ok, 3 slow failed.
local function window_count()
  local w = redis.call('HMGET', K_WIN, 'n', 'h', 'f', 's', 'k')
  local W = {c = num(w[1], 0), h = num(w[2], 0), f = num(w[3], 0), s = num(w[4], 0)}
  if w[1] == false or w[1] == nil then
    W.fresh = true
  elseif w[5] ~= WTAG then
    redis.call('DEL', K_WIN)
    W.c, W.h, W.f, W.s, W.fresh = 0, 0, 0, 0, true
  elseif W.c > CFG.wn or W.h >= CFG.wn or W.h < 0 or W.f < 0 or W.s < 0
      or W.f > W.c or W.s > W.c then
    repair('window from another config')
    redis.call('DEL', K_WIN)
    W.c, W.h, W.f, W.s, W.fresh = 0, 0, 0, 0, true
  end
  return W
end

local function window_view()
  if CFG.count then return window_count() end
  return window_time(false)
end

-- Writing to the window: open it once per call, push outcomes in memory, close it once.
-- A batch of outcomes then costs one read and one write, not two calls per outcome.
local function window_open()
  local W
  if CFG.count then
    W = window_count()
    W.set, W.old = {}, {}
  else
    W = window_time(true)
  end
  return W
end

-- Count window: the codes of the slots that `n` more outcomes will overwrite, read in one
-- HMGET (only slots that hold an outcome and were not written in this call).
local function prefetch(W, n)
  local want = {}
  local m = math.min(n, CFG.wn)
  for j = 0, m - 1 do
    local slot = (W.h + j) % CFG.wn
    if W.c + j >= CFG.wn and W.set[slot] == nil and W.old[slot] == nil then
      want[#want + 1] = tostring(slot)
    end
  end
  for from = 1, #want, 1000 do  -- in chunks: unpack() has a stack limit
    local part = {unpack(want, from, math.min(from + 999, #want))}
    local got = redis.call('HMGET', K_WIN, unpack(part))
    for i, f in ipairs(part) do W.old[tonumber(f)] = num(got[i], 0) end
  end
end

-- Adds `n` equal outcomes (failed, slow) to the window's totals.
local function window_push(W, failed, slow, n)
  W.dirty = true
  if not CFG.count then
    W.c, W.bc = W.c + n, W.bc + n
    if failed then W.f, W.bf = W.f + n, W.bf + n end
    if slow then W.s, W.bs = W.s + n, W.bs + n end
    return
  end
  if n > 1 or W.c >= CFG.wn then prefetch(W, n) end
  local code = 0
  if failed then code = 1 end
  if slow then code = code + 2 end
  for _ = 1, n do
    local slot = W.h
    if W.c >= CFG.wn then
      local old = W.set[slot]
      if old == nil then old = W.old[slot] or 0 end
      if old == 1 or old == 3 then W.f = W.f - 1 end
      if old >= 2 then W.s = W.s - 1 end
    else
      W.c = W.c + 1
    end
    if failed then W.f = W.f + 1 end
    if slow then W.s = W.s + 1 end
    W.set[slot] = code
    W.h = (W.h + 1) % CFG.wn
  end
end

local function window_close(W)
  if not W.dirty then return end
  if CFG.count then
    local a = {'n', W.c, 'h', W.h, 'f', W.f, 's', W.s}
    for slot, code in pairs(W.set) do
      a[#a + 1] = tostring(slot)
      a[#a + 1] = code
      if #a >= 2000 then  -- in chunks: unpack() has a stack limit
        redis.call('HSET', K_WIN, unpack(a))
        a = {}
      end
    end
    if #a > 0 then redis.call('HSET', K_WIN, unpack(a)) end
  else
    redis.call('HSET', K_WIN, 'e', W.ep, 'c', W.c, 'f', W.f, 's', W.s,
      'c' .. W.i, W.bc, 'f' .. W.i, W.bf, 's' .. W.i, W.bs)
  end
  if W.fresh then
    redis.call('HSET', K_WIN, 'k', WTAG)
    redis.call('PEXPIRE', K_WIN, CFG.ttl)
  end
end

-- The longest lease any config can grant (probe_lease and timeout_duration are at most a
-- day), plus a second of slack: a lease expiring later than NOW + this is garbage.
local MAX_LEASE_MS = 86400000 + 1000

-- Removes expired leases (and garbage ones); returns how many are active and when the
-- first one ends.
local function probes_active()
  local ok = pcall(redis.call, 'ZREMRANGEBYSCORE', K_PROBES, '-inf', NOW)
  if not ok then
    redis.call('DEL', K_PROBES)
    repair('probes key had the wrong type')
    return 0, 0
  end
  local bad = redis.call('ZREMRANGEBYSCORE', K_PROBES, '(' .. (NOW + MAX_LEASE_MS), '+inf')
  if bad > 0 then
    repair('dropped ' .. bad .. ' probe lease(s) expiring more than a day ahead')
  end
  local n = redis.call('ZCARD', K_PROBES)
  local first = 0
  if n > 0 then
    local r = redis.call('ZRANGE', K_PROBES, 0, 0, 'WITHSCORES')
    first = num(r[2], NOW)
  end
  return n, first
end

-- The reply every script returns (Lua numbers become Redis integers):
--  1 decision  2 state  3 forced  4 generation  5 open_until_ms  6 now_ms
--  7 transition_from ('' if none)  8 retry_after_ms (-1: until the override is released)
--  9 probes_free (-1: unknown)  10 window calls  11 window failures  12 window slow
--  13 consecutive_failures  14 note ('' or what was repaired)
local function reply(decision, S, retry_after, free, W)
  local c, f, s = -1, -1, -1
  if W then c, f, s = W.c, W.f, W.s end
  return {decision, S.state, S.forced, S.gen, S.open_until, NOW, S.from, retry_after, free,
          c, f, s, S.cf, NOTE}
end
