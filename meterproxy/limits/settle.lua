-- settle.lua: replace a request's reservation by its real usage; release its leases. Idempotent.
--
-- KEYS  1 key tpm  2 key leases  3 key day  4 key month
--       5 user tpm 6 user leases 7 user day 8 user month  9 reservation
-- ARGV  1 request_id  2 real tokens  3 real cost_nano  4 key tpm  5 user tpm ("" = unlimited)
--       6 time offset ms (0 except in tests)
-- Returns 1 when a reservation was settled, 0 when there was none (already settled or expired).

-- the leases go whatever happens: a lease must never outlive its request
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])

local rec = redis.call('GET', KEYS[9])
if not rec then return 0 end
redis.call('DEL', KEYS[9])
local rtok, rcost, day_id, mon_id = string.match(rec, '^([^:]+):([^:]+):([^:]+):([^:]+)$')
local dtok = tonumber(ARGV[2]) - tonumber(rtok)
local dcost = tonumber(ARGV[3]) - tonumber(rcost)

-- a refund never lifts a bucket above capacity (consumption floors at 0); a charge may leave debt
if dtok ~= 0 then
  local now = clock(ARGV[6])
  local kcap, ucap = tonumber(ARGV[4]), tonumber(ARGV[5])
  for _, kc in ipairs({{KEYS[1], kcap}, {KEYS[5], ucap}}) do
    if kc[2] then
      local u = used(kc[1], kc[2], now) + dtok * S
      if u < 0 then u = 0 end
      put(kc[1], kc[2], u, now)
    end
  end
end

-- budgets settle in the window the admission charged; a window that has rolled over is left alone
local function rebill(key, wid)
  if wid == '-' or redis.call('HGET', key, 'w') ~= wid then return end
  if dtok ~= 0 and redis.call('HINCRBY', key, 't', dtok) < 0 then redis.call('HSET', key, 't', 0) end
  if dcost ~= 0 and redis.call('HINCRBY', key, 'c', dcost) < 0 then redis.call('HSET', key, 'c', 0) end
end
rebill(KEYS[3], day_id)
rebill(KEYS[4], mon_id)
rebill(KEYS[7], day_id)
rebill(KEYS[8], mon_id)
return 1
