-- charge.lua: add usage served while Redis was unreachable (store.on_error: open) to the budget
-- counters of the windows it was used in, once: KEYS[5] marks this charge as applied, so a retry
-- after a timeout that did commit changes nothing. A window that has ended is skipped, and so is
-- a counter already on a later window.
-- KEYS: key day, key month, user day, user month, marker.
-- ARGV: tokens, cost, day id, month id, day end ms, month end ms, marker ttl ms, time offset ms.
if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', tonumber(ARGV[7])) then return 0 end
local now = clock(ARGV[8])
local tokens, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local function add(key, wid, fin)
  local left = tonumber(fin) - now
  if left <= 0 then return end
  local cur = redis.call('HGET', key, 'w')
  if cur == wid then
    redis.call('HINCRBY', key, 't', tokens)
    redis.call('HINCRBY', key, 'c', cost)
  elseif (not cur) or cur < wid then
    redis.call('HSET', key, 'w', wid, 't', tokens, 'c', cost)
    redis.call('PEXPIRE', key, left)
  end
end
add(KEYS[1], ARGV[3], ARGV[5])
add(KEYS[2], ARGV[4], ARGV[6])
add(KEYS[3], ARGV[3], ARGV[5])
add(KEYS[4], ARGV[4], ARGV[6])
return 1
