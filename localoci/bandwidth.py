"""Bandwidth caps for object reads, enforced with token buckets."""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """Allows ``rate`` bytes per second on average, with a burst of a tenth of a second."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.capacity = max(self.rate / 10, 64 * 1024)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until ``n`` bytes may pass."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
