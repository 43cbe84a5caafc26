"""Exponential backoff with full jitter, for the polling and delivery loops."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``initial`` up to ``maximum``; ``reset`` after a success."""

    def __init__(self, initial: float, maximum: float, *, jitter: bool = True) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.attempts = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2.0 ** min(self.attempts, 30)))
        self.attempts += 1
        if not self.jitter:
            return ceiling
        # Full jitter, but never less than half: a retry storm is what we avoid,
        # an immediate retry against a failing endpoint is what we also avoid.
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
