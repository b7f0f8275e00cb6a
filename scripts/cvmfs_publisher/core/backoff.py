"""Capped exponential backoff with full jitter.

One policy for every wait after a failure: AMQP reconnection, a
repository's failed publish, a busy transaction. Stdlib only, so the sync
daemon (which talks to no broker) does not load pika for it.
"""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self.failures = 0

    def next(self) -> float:
        """Delay before the next attempt; grows with each call."""
        self.failures += 1
        cap = min(self.maximum, self.initial * 2 ** (self.failures - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    def reset(self) -> None:
        self.failures = 0
