-- common.lua: helpers prepended to admit.lua, settle.lua and status.lua when they are loaded.
--
-- Buckets store consumption, not availability: "used:stamp_ms", used in 1/60000 token units so
-- that refill (capacity/60 tokens per second = capacity units per ms) is exact integer arithmetic
-- and a lowered capacity keeps what was consumed. A missing bucket is an idle, full one.

local S = 60000

-- script time in ms: Redis TIME (never the proxies' clocks) plus an offset that only tests set
local function clock(offset)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(offset)
end

-- consumption of a bucket at `now` after continuous refill
local function used(key, cap, now)
  local v = redis.call('GET', key)
  if not v then return 0 end
  local sep = string.find(v, ':', 1, true)
  local u = tonumber(string.sub(v, 1, sep - 1))
  local dt = now - tonumber(string.sub(v, sep + 1))
  if dt > 0 then u = u - dt * cap end
  if u < 0 then return 0 end
  return u
end

-- store consumption; the key expires once refilled (relative TTL, so test offsets are harmless)
local function put(key, cap, u, now)
  redis.call('SET', key, string.format('%.0f:%.0f', u, now), 'PX', math.ceil(u / cap) + 1000)
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- UTC calendar windows at `now`: day id, month id, ms until each ends (H. Hinnant's algorithms)
local function windows(now)
  local days = math.floor(now / 86400000)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  if m <= 2 then y = y + 1 end
  local mon_end
  if m == 12 then mon_end = days_from_civil(y + 1, 1, 1) else mon_end = days_from_civil(y, m + 1, 1) end
  return string.format('%04d-%02d-%02d', y, m, d), string.format('%04d-%02d', y, m),
    (days + 1) * 86400000 - now, mon_end * 86400000 - now
end

-- a budget window's {tokens, usd_nano}; a hash left from another window counts as empty
local function budget(key, wid)
  local v = redis.call('HMGET', key, 'w', 't', 'c')
  if v[1] ~= wid then return 0, 0 end
  return tonumber(v[2]) or 0, tonumber(v[3]) or 0
end
