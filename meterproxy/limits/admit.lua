-- admit.lua: admit one request against every limit of its key and its user, all or nothing.
-- Semantics are documented in meterproxy/limits/redis.py and mirrored by memory.py.
--
-- KEYS  1 key rpm  2 key tpm  3 key leases  4 key day  5 key month
--       6 user rpm 7 user tpm 8 user leases 9 user day 10 user month  11 reservation
-- ARGV  1 request_id  2 tokens  3 cost_nano
--       4..10 key limits, 11..17 user limits: rpm tpm concurrency daily_tokens monthly_tokens
--       daily_usd_nano monthly_usd_nano ("" = unlimited)
--       18 lease ttl ms  19 reservation ttl ms  20 time offset ms (0 except in tests)
-- Returns {allowed, limit, retry_ms, too_large, lim_req, rem_req, reset_req_ms,
--          lim_tok, rem_tok, reset_tok_ms}; -1 stands for "none" (a Lua nil would cut the array).

local CONC_RETRY_MS = 1000  -- a lease frees when some request ends: no better estimate exists

local tokens, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local function lim(i) return tonumber(ARGV[i]) end
local krpm, ktpm, kconc, kdt, kmt, kdu, kmu = lim(4), lim(5), lim(6), lim(7), lim(8), lim(9), lim(10)
local urpm, utpm, uconc, udt, umt, udu, umu =
  lim(11), lim(12), lim(13), lim(14), lim(15), lim(16), lim(17)

-- too large can never pass: answered before anything is read
if (ktpm and tokens > ktpm) or (utpm and tokens > utpm) then
  return {0, 'tokens', -1, 1, -1, -1, -1, -1, -1, -1}
end

local now = clock(ARGV[20])
local has_kd, has_km = (kdt or kdu) ~= nil, (kmt or kmu) ~= nil
local has_ud, has_um = (udt or udu) ~= nil, (umt or umu) ~= nil
local day_id, mon_id, day_left, mon_left
if has_kd or has_km or has_ud or has_um then day_id, mon_id, day_left, mon_left = windows(now) end

-- budget spent (docs/api.md "Errors": once spent, 429 insufficient_quota): deny when used >= limit
local function spent(key, wid, ltok, lusd, ntok, nusd)
  local ut, uc = budget(key, wid)
  if ltok and ut >= ltok then return ntok end
  if lusd and uc >= lusd then return nusd end
  return nil
end
local b
if has_kd then b = spent(KEYS[4], day_id, kdt, kdu, 'daily_tokens', 'daily_usd') end
if not b and has_km then b = spent(KEYS[5], mon_id, kmt, kmu, 'monthly_tokens', 'monthly_usd') end
if not b and has_ud then b = spent(KEYS[9], day_id, udt, udu, 'daily_tokens', 'daily_usd') end
if not b and has_um then b = spent(KEYS[10], mon_id, umt, umu, 'monthly_tokens', 'monthly_usd') end

-- buckets and leases: the longest wait is reported
local deny, wait = nil, -1
local function bucket(key, cap, units, name)
  local u = used(key, cap, now)
  local need = u + units - cap * S
  if need > 0 then
    local w = math.ceil(need / cap)
    if w > wait then deny, wait = name, w end
  end
  return u
end
local function leases(key, limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= limit and CONC_RETRY_MS > wait then
    deny, wait = 'concurrency', CONC_RETRY_MS
  end
end
local u_krpm, u_ktpm, u_urpm, u_utpm
if krpm then u_krpm = bucket(KEYS[1], krpm, S, 'requests') end
if ktpm then u_ktpm = bucket(KEYS[2], ktpm, tokens * S, 'tokens') end
if kconc then leases(KEYS[3], kconc) end
if urpm then u_urpm = bucket(KEYS[6], urpm, S, 'requests') end
if utpm then u_utpm = bucket(KEYS[7], utpm, tokens * S, 'tokens') end
if uconc then leases(KEYS[8], uconc) end

local allowed = (b == nil and deny == nil)
if allowed then
  if krpm then u_krpm = u_krpm + S; put(KEYS[1], krpm, u_krpm, now) end
  if ktpm then u_ktpm = u_ktpm + tokens * S; put(KEYS[2], ktpm, u_ktpm, now) end
  if urpm then u_urpm = u_urpm + S; put(KEYS[6], urpm, u_urpm, now) end
  if utpm then u_utpm = u_utpm + tokens * S; put(KEYS[7], utpm, u_utpm, now) end
  local ttl = tonumber(ARGV[18])
  for _, kl in ipairs({{KEYS[3], kconc}, {KEYS[8], uconc}}) do
    if kl[2] then
      redis.call('ZADD', kl[1], now + ttl, ARGV[1])
      redis.call('PEXPIRE', kl[1], ttl)  -- the newest lease is the last to expire
    end
  end
  local function charge(key, wid, left)
    if redis.call('HGET', key, 'w') == wid then
      redis.call('HINCRBY', key, 't', tokens)
      redis.call('HINCRBY', key, 'c', cost)
    else
      redis.call('HSET', key, 'w', wid, 't', tokens, 'c', cost)
      redis.call('PEXPIRE', key, left)  -- the counter dies with its window
    end
  end
  if has_kd then charge(KEYS[4], day_id, day_left) end
  if has_km then charge(KEYS[5], mon_id, mon_left) end
  if has_ud then charge(KEYS[9], day_id, day_left) end
  if has_um then charge(KEYS[10], mon_id, mon_left) end
  -- what settlement needs: the reserved amounts and the windows they were charged to
  redis.call('SET', KEYS[11], string.format('%.0f:%.0f:%s:%s', tokens, cost,
    day_id or '-', mon_id or '-'), 'PX', tonumber(ARGV[19]))
end

-- x-ratelimit snapshot: the key's own buckets, else the user's
local function snap(cap, u)
  if not cap then return -1, -1, -1 end
  local rem = math.floor((cap * S - u) / S)
  if rem < 0 then rem = 0 end
  return cap, rem, math.ceil(u / cap)
end
local lr, rr, sr, lt, rt, st
if krpm then lr, rr, sr = snap(krpm, u_krpm) else lr, rr, sr = snap(urpm, u_urpm) end
if ktpm then lt, rt, st = snap(ktpm, u_ktpm) else lt, rt, st = snap(utpm, u_utpm) end

if allowed then return {1, '', -1, 0, lr, rr, sr, lt, rt, st} end
if b then return {0, b, -1, 0, lr, rr, sr, lt, rt, st} end
return {0, deny, wait, 0, lr, rr, sr, lt, rt, st}
