"""Rate limits and quota counters in Redis, shared by every replica.

The same semantics as appliance.gateway.ratelimit (a bucket bursts to its per-minute limit
and refills steadily; the exact token cost is charged up front; refunds once the real count is
known), but each decision is one Lua script: read, refill, check, charge and report happen
atomically in one round trip, on Redis's clock (replicas' clocks may disagree).

Redis unreachable: on_redis_down = "fail_closed" refuses with 503 BACKEND_UNAVAILABLE and
Retry-After; "fail_open" admits, logs once and counts appliance_backend_fail_open_total."""

from __future__ import annotations

import math
import time
from typing import Any

from appliance.cluster.redis_client import ERRORS, RedisBackend
from appliance.errors import BackendUnavailable
from appliance.gateway.ratelimit import LimitState, refuse
from appliance.gateway.usage import quota_exhausted

# KEYS: requests bucket, tokens bucket, then (optional) response-cache entries. ARGV: rpm,
# tpm, requests to take, tokens to take, force (1: settle, take without checking), then one
# token cost per cache entry: charged only for the entries Redis does not hold (the answers it
# holds cost nothing). Returns {refused (0 none, 1 requests, 2 tokens, 3 tokens over the
# limit), requests level, tokens level, wait seconds, tokens charged, cache values...}: the
# request limit, the second cache level and the token charge in one round trip.
BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, limit)
  local v = redis.call('HMGET', key, 'l', 'u')
  local l, u = tonumber(v[1]), tonumber(v[2])
  if l == nil then return limit end
  if l > limit then l = limit end
  if now > u then l = math.min(limit, l + (now - u) * limit / 60) end
  return l
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local take_r, take_t, force = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local r, tk = level(KEYS[1], rpm), level(KEYS[2], tpm)
if force == 0 and take_r > 0 and r < take_r then
  return {1, tostring(r), tostring(tk), tostring((take_r - r) / (rpm / 60)), '0'}
end
local values = {}
if #KEYS > 2 then values = redis.call('MGET', unpack(KEYS, 3, #KEYS)) end
for i = 1, #values do
  if not values[i] then take_t = take_t + tonumber(ARGV[5 + i]) end
end
if force == 0 then
  if take_t > tpm then return {3, tostring(r), tostring(tk), '0', tostring(take_t)} end
  if take_t > 0 and tk < take_t then
    return {2, tostring(r), tostring(tk), tostring((take_t - tk) / (tpm / 60)), tostring(take_t)}
  end
end
r = r - take_r
tk = math.min(tpm, tk - take_t)
-- Only a bucket that changed is written (a settle passes no requests limit of its own).
if take_r ~= 0 then
  redis.call('HSET', KEYS[1], 'l', tostring(r), 'u', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
end
if take_t ~= 0 then
  redis.call('HSET', KEYS[2], 'l', tostring(tk), 'u', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120)
end
local out = {0, tostring(r), tostring(tk), '0', tostring(take_t)}
for i = 1, #values do out[5 + i] = values[i] end
return out
"""

# KEYS: the key's spend counter. ARGV: tokens (negative: a refund), quota (-1: none).
# Returns {status (0 charged, 1 over quota, 2 counter missing: seed it), spent}.
SPEND = """
local s = redis.call('GET', KEYS[1])
if not s then return {2, 0} end
s = tonumber(s)
local n, q = tonumber(ARGV[1]), tonumber(ARGV[2])
if n > 0 and q >= 0 and s + n > q then return {1, s} end
return {0, redis.call('INCRBY', KEYS[1], n)}
"""


class RedisLimiter:
    """The appliance.gateway.ratelimit.RateLimiter interface, on Redis."""

    def __init__(self, backend: RedisBackend, *, fail_open: bool, prefix: str = "apl") -> None:
        self.backend = backend
        self.fail_open = fail_open
        self.prefix = prefix
        self._script = backend.client.register_script(BUCKETS)
        self._ascript: Any = None

    async def _arun(
        self,
        key_id: str,
        rpm: int,
        tpm: int,
        req: int,
        tok: int,
        fetch: list[str] | None = None,
        costs: list[int] | None = None,
    ) -> Any:
        if self._ascript is None:
            self._ascript = self.backend.aclient.register_script(BUCKETS)
        try:
            return await self.backend.acall(
                self._ascript,
                keys=[*self._keys(key_id), *(fetch or ())],
                args=[rpm, tpm, req, tok, 0, *(costs or ())],
            )
        except ERRORS:
            return self._down()

    def _down(self) -> None:
        if self.fail_open:
            self.backend.health.admitted_open()
            return None
        raise BackendUnavailable(
            "The rate limiter (Redis) is unreachable; retry shortly.",
            details={"backend": "redis"},
            retry_after=2,
        )

    def _keys(self, key_id: str) -> list[str]:
        return [f"{self.prefix}:rl:{{{key_id}}}:r", f"{self.prefix}:rl:{{{key_id}}}:t"]

    def _run(self, key_id: str, rpm: int, tpm: int, req: int, tok: int, force: int) -> Any:
        try:
            return self.backend.call(
                self._script, keys=self._keys(key_id), args=[rpm, tpm, req, tok, force]
            )
        except ERRORS:
            return self._down()

    @staticmethod
    def _state(rpm: int, tpm: int, requests: float, tokens: float, now: float) -> LimitState:
        full = max((rpm - requests) / (rpm / 60), (tpm - tokens) / (tpm / 60), 0.0)
        return LimitState(
            limit_requests=rpm,
            remaining_requests=max(0, math.floor(requests)),
            limit_tokens=tpm,
            remaining_tokens=max(0, math.floor(tokens)),
            reset=math.ceil(now + full),
        )

    def _decide(self, key_id: str, rpm: int, tpm: int, req: int, tok: int) -> LimitState:
        return self._judge(self._run(key_id, rpm, tpm, req, tok, 0), rpm, tpm, tok)

    async def _adecide(self, key_id: str, rpm: int, tpm: int, req: int, tok: int) -> LimitState:
        return self._judge(await self._arun(key_id, rpm, tpm, req, tok), rpm, tpm, tok)

    async def aadmit_request(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        return await self._adecide(key_id, rpm, tpm, 1, 0)

    async def aadmit_charge(
        self,
        key_id: str,
        rpm: int,
        tpm: int,
        tokens: int,
        fetch: list[str],
        costs: list[int],
    ) -> tuple[LimitState, list[bytes | None], int]:
        """One request, `tokens`, and the cost of each entry of `fetch` (the response cache's
        second level) that Redis does not hold, charged atomically in one round trip. Returns
        the limits, the entries' values (None: not held) and the tokens charged."""
        out = await self._arun(key_id, rpm, tpm, 1, tokens, fetch, costs)
        if out is None:  # fail open: admitted, nothing read, every token counted
            return self._judge(out, rpm, tpm, 0), [None] * len(fetch), tokens + sum(costs)
        charged = int(float(out[4]))
        state = self._judge(out, rpm, tpm, charged)
        values = list(out[5:])
        return state, values + [None] * (len(fetch) - len(values)), charged

    async def aadmit_tokens(self, key_id: str, rpm: int, tpm: int, tokens: int) -> LimitState:
        return await self._adecide(key_id, rpm, tpm, 0, max(tokens, 0))

    def _judge(self, out: Any, rpm: int, tpm: int, tok: int) -> LimitState:
        now = time.time()
        if out is None:  # fail open: nothing is known, report full buckets
            return self._state(rpm, tpm, rpm, tpm, now)
        refused, requests, tokens, wait = int(out[0]), float(out[1]), float(out[2]), float(out[3])
        state = self._state(rpm, tpm, requests, tokens, now)
        if refused == 1:
            refuse("requests", wait, rpm, 1, state)
        elif refused == 3:
            refuse("tokens", math.inf, tpm, tok, state)
        elif refused == 2:
            refuse("tokens", wait, tpm, tok, state)
        return state

    def admit_request(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        return self._decide(key_id, rpm, tpm, 1, 0)

    def admit_tokens(self, key_id: str, rpm: int, tpm: int, tokens: int) -> LimitState:
        if tokens <= 0:
            return self.state(key_id, rpm, tpm)
        return self._decide(key_id, rpm, tpm, 0, tokens)

    def settle_tokens(self, key_id: str, tpm: int, delta: int) -> None:
        if delta:
            # A settle leaves the requests bucket unwritten; any positive limit will do.
            self._run(key_id, 1 << 30, tpm, 0, delta, 1)

    def state(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        return self._decide(key_id, rpm, tpm, 0, 0)


class RedisSpend:
    """Quota counters: Redis decides (atomically, for every replica at once); PostgreSQL keeps
    the durable total, written behind by the usage log (`durable` reads it to seed a counter
    Redis lost, e.g. after a restart without persistence)."""

    def __init__(self, backend: RedisBackend, durable: Any, *, fail_open: bool) -> None:
        self.backend = backend
        self.durable = durable
        self.fail_open = fail_open
        self._script = backend.client.register_script(SPEND)

    def _key(self, key_id: str) -> str:
        return f"apl:spend:{{{key_id}}}"

    def charge(self, key_id: str, quota: int | None, tokens: int) -> int | None:
        """Add `tokens` (refund if negative); InsufficientBalance when it does not fit. The new
        total, or None when Redis is down and on_redis_down admits."""
        for _ in range(2):
            try:
                status, spent = self.backend.call(
                    self._script,
                    keys=[self._key(key_id)],
                    args=[tokens, -1 if quota is None else quota],
                )
            except ERRORS:
                if self.fail_open:
                    self.backend.health.admitted_open()
                    return None
                raise BackendUnavailable(
                    "The quota counter (Redis) is unreachable; retry shortly.",
                    details={"backend": "redis"},
                    retry_after=2,
                ) from None
            if status == 2:  # unseeded: start from the durable total
                try:
                    total = self.durable(key_id)
                except BackendUnavailable:
                    if quota is None:  # nothing to decide: the durable total gets it later
                        return None
                    raise
                self.backend.call(self.backend.client.set, self._key(key_id), total, nx=True)
                continue
            if status == 1:
                raise quota_exhausted(spent, quota, tokens)
            return int(spent)
        raise BackendUnavailable("The quota counter could not be seeded.", retry_after=2)

    def spent(self, key_id: str) -> int | None:
        try:
            value = self.backend.call(self.backend.client.get, self._key(key_id))
        except ERRORS:
            return None
        return None if value is None else int(value)
