"""The retry policy, both layers, in one place.

Inner layer: tenacity, inside the job, for blips that clear in milliseconds
(a few attempts, full jitter, a small cap). Outer layer: the queue. When the
inner layer gives up, the order is recorded as PAYMENT_FAILED and its job is
scheduled again after an exponential backoff with equal jitter (half the step
fixed, half random), so retries spread out but never collapse to zero delay.
Only errors marked retryable are retried by either layer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from failfirst.config import RetryConfig

T = TypeVar("T")


def _retryable(exc: BaseException) -> bool:
    return bool(getattr(exc, "retryable", False))


@dataclass(frozen=True)
class RetryPolicy:
    config: RetryConfig

    def inner(self) -> Retrying:
        """A tenacity controller for quick in-job retries of retryable errors."""
        c = self.config
        return Retrying(
            stop=stop_after_attempt(c.inner_attempts),
            wait=wait_random_exponential(multiplier=c.inner_base, max=c.inner_cap),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )

    def call(self, fn: Callable[[int], T]) -> T:
        """Run `fn(inner_attempt)` under the inner policy; the last error propagates."""
        counter = {"n": 0}

        def attempt() -> T:
            counter["n"] += 1
            return fn(counter["n"])

        return self.inner()(attempt)

    def exhausted(self, round_attempts: int) -> bool:
        """Whether the queue-level budget is spent after `round_attempts` attempts."""
        return round_attempts >= self.config.attempts

    def backoff(self, round_attempts: int, rng: random.Random) -> float:
        """Delay before queue-level attempt `round_attempts + 1`, in seconds."""
        c = self.config
        step = min(c.cap, c.base * c.factor ** max(round_attempts - 1, 0))
        return step / 2 + rng.random() * step / 2
