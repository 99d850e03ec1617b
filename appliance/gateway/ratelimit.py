"""Token buckets per API key: one for requests per minute, one for tokenizer tokens per minute.

Pure logic with an injected clock (tests freeze time instead of sleeping). A bucket holds up
to `limit` units and refills at limit/60 per second, so a key may burst to its per-minute
limit and then runs at the steady rate. Token costs are known exactly before the model runs
(inputs are tokenised first), so the token bucket is charged up front: a burst can never
overrun it. Calls run on the event loop thread, so check-and-take is atomic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import RateLimited

Clock = Callable[[], float]


@dataclass
class TokenBucket:
    limit: float
    level: float
    updated: float

    @property
    def rate(self) -> float:
        return self.limit / 60.0

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.limit, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now; inf: never, it exceeds the limit)."""
        self.refill(now)
        if amount > self.limit:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def seconds_to_full(self, now: float) -> float:
        self.refill(now)
        return (self.limit - self.level) / self.rate


@dataclass(frozen=True)
class LimitState:
    """What the X-RateLimit-* headers report."""

    limit_requests: int
    remaining_requests: int
    limit_tokens: int
    remaining_tokens: int
    reset: int  # unix time when both buckets are full again

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit-Requests": str(self.limit_requests),
            "X-RateLimit-Remaining-Requests": str(self.remaining_requests),
            "X-RateLimit-Limit-Tokens": str(self.limit_tokens),
            "X-RateLimit-Remaining-Tokens": str(self.remaining_tokens),
            "X-RateLimit-Reset": str(self.reset),
        }


def refuse(what: str, wait: float, limit: int, amount: int, state: LimitState) -> None:
    if math.isinf(wait):
        raise RateLimited(
            f"This request needs {amount} {what}, more than the key's limit of {limit} "
            f"{what} per minute; split it.",
            details={"limit": limit, "needed": amount},
            retry_after=60,
            headers=state.headers(),
        )
    raise RateLimited(
        f"Rate limit of {limit} {what} per minute exceeded.",
        details={"limit": limit},
        retry_after=max(1, math.ceil(wait)),
        headers=state.headers(),
    )


class RateLimiter:
    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, key_id: str, kind: str, limit: int) -> TokenBucket:
        bucket = self._buckets.get((key_id, kind))
        if bucket is None:
            bucket = self._buckets[(key_id, kind)] = TokenBucket(limit, limit, self.clock())
        elif bucket.limit != limit:  # the key's limit was changed while running
            bucket.refill(self.clock())
            bucket.level = min(bucket.level, limit)
            bucket.limit = limit
        return bucket

    def admit_request(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        now = self.clock()
        bucket = self._bucket(key_id, "requests", rpm)
        wait = bucket.wait_for(1, now)
        if wait > 0:
            refuse("requests", wait, rpm, 1, self.state(key_id, rpm, tpm))
        bucket.take(1, now)
        return self.state(key_id, rpm, tpm)

    # The request path awaits these: a shared limiter (Redis, cluster mode) answers over the
    # network without holding the event loop; this one answers at once.
    async def aadmit_request(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        return self.admit_request(key_id, rpm, tpm)

    async def aadmit_charge(
        self,
        key_id: str,
        rpm: int,
        tpm: int,
        tokens: int,
        fetch: list[str],
        costs: list[int],
    ) -> tuple[LimitState, list[bytes | None], int]:
        """Admit one request and charge `tokens` plus the `costs` of the `fetch` entries a
        shared cache level does not hold (cluster mode's limiter reads them in the same
        round trip; here there is no such level, so every cost is charged)."""
        state = self.admit_request(key_id, rpm, tpm)
        charged = tokens + sum(costs)
        if charged > 0:
            state = self.admit_tokens(key_id, rpm, tpm, charged)
        return state, [None] * len(fetch), charged

    async def aadmit_tokens(self, key_id: str, rpm: int, tpm: int, tokens: int) -> LimitState:
        return self.admit_tokens(key_id, rpm, tpm, tokens)

    def admit_tokens(self, key_id: str, rpm: int, tpm: int, tokens: int) -> LimitState:
        if tokens <= 0:
            return self.state(key_id, rpm, tpm)
        now = self.clock()
        bucket = self._bucket(key_id, "tokens", tpm)
        wait = bucket.wait_for(tokens, now)
        if wait > 0:
            refuse("tokens", wait, tpm, tokens, self.state(key_id, rpm, tpm))
        bucket.take(tokens, now)
        return self.state(key_id, rpm, tpm)

    def settle_tokens(self, key_id: str, tpm: int, delta: int) -> None:
        """Charge (delta > 0) or give back (delta < 0) tokens once the real count is known."""
        if delta:
            bucket = self._bucket(key_id, "tokens", tpm)
            bucket.take(delta, self.clock())
            bucket.level = min(bucket.level, bucket.limit)

    def state(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        now = self.clock()
        requests = self._bucket(key_id, "requests", rpm)
        tokens = self._bucket(key_id, "tokens", tpm)
        reset = now + max(requests.seconds_to_full(now), tokens.seconds_to_full(now))
        return LimitState(
            limit_requests=rpm,
            remaining_requests=max(0, math.floor(requests.level)),
            limit_tokens=tpm,
            remaining_tokens=max(0, math.floor(tokens.level)),
            reset=math.ceil(reset),
        )
