-- status.lua: read-only view of a key's limits for GET /usage.
--
-- KEYS  1 rpm  2 tpm  3 leases  4 day  5 month
-- ARGV  1 rpm  2 tpm ("" = unlimited)  3 time offset ms (0 except in tests)
-- Returns {rpm used units, tpm used units, live leases, day tokens, day usd_nano, ms to day end,
--          month tokens, month usd_nano, ms to month end}.

local now = clock(ARGV[3])
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local day_id, mon_id, day_left, mon_left = windows(now)
local dt_, du_ = budget(KEYS[4], day_id)
local mt_, mu_ = budget(KEYS[5], mon_id)
return {rpm and used(KEYS[1], rpm, now) or 0, tpm and used(KEYS[2], tpm, now) or 0,
  redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf'), dt_, du_, day_left, mt_, mu_, mon_left}
