"""A per-customer token bucket in Redis, refilled continuously.

One Lua script reads, refills and spends atomically, so concurrent placements
from many processes (or hosts) share one bucket without a race. Time comes from
the Redis server's clock, so placers on hosts with skewed clocks agree.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from failfirst.errors import RateLimited

if TYPE_CHECKING:
    from redis import Redis

_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; rate 0 disables the limit."""

    def __init__(self, redis: Redis, rate: float, burst: int, prefix: str = "failfirst:rl:") -> None:
        self.redis, self.rate, self.burst, self.prefix = redis, rate, burst, prefix
        self._script = redis.register_script(_SCRIPT) if rate > 0 else None

    def take(self, customer: str) -> None:
        """Spend one token or raise RateLimited saying when the next one arrives."""
        if self._script is None:
            return
        allowed, wait_ms = self._script(keys=[self.prefix + customer], args=[self.rate, self.burst])
        if not int(allowed):
            seconds = max(int(wait_ms), 1) / 1000
            raise RateLimited(
                f"customer {customer!r} is over its rate limit "
                f"({self.rate:g}/s, burst {self.burst}); retry in {math.ceil(seconds * 10) / 10:.1f}s",
                retry_after=seconds,
            )
