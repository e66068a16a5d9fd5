"""Bandwidth caps on object reads and writes, enforced with token buckets, and the bytes object reads sent.

Two caps: each connection's object reads, and each instance's network (a rate per OCPU, as flexible
VM shapes get), which all of the instance's connections share, its receiving and its sending apart.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Iterable

THROTTLED_STEP = 256 * 1024  # bytes sent or received per token-bucket reservation
# The two directions of an instance's network, as the instance sees them: object reads, object writes.
RECEIVE, SEND = "receive", "send"


class TokenBucket:
    """Allows ``rate`` bytes per second on average, with a burst of a tenth of a second.

    A caller reserves its bytes at once, driving the balance negative, and then waits until the
    debt is paid off. Callers sharing a bucket queue behind each other's debt, so together they
    get exactly ``rate`` however many there are, each in turn.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.capacity = max(self.rate / 10, 64 * 1024)
        self.clock = clock
        self.tokens = self.capacity
        self.stamp = clock()
        self.passed = 0  # bytes reserved through this bucket, all told
        self.lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes now; the seconds the caller must wait before sending them."""
        with self.lock:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            self.passed += n
            return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def take(self, n: int, sleep: Callable[[float], None] = time.sleep) -> None:
        """Block until ``n`` bytes may pass."""
        take_all([self], n, sleep)


def take_all(buckets: Iterable[TokenBucket], n: int, sleep: Callable[[float], None] = time.sleep) -> None:
    """Block until ``n`` bytes may pass every bucket: the longest wait, not the sum of them."""
    wait = max((bucket.reserve(n) for bucket in buckets), default=0.0)
    if wait > 0:
        sleep(wait)


class InstanceNetworks:
    """The networks of the live instances, each capped at ``per_ocpu`` times its OCPUs (None: no cap).

    One bucket per instance address and direction, shared by every connection from that address
    (the instance's NIC, whose sending and receiving are separate): object reads are what it
    receives, object writes what it sends. ``ocpus_at`` says the OCPUs of the live instance at an
    address, if there is one there.
    """

    def __init__(self, ocpus_at: Callable[[str], float | None]) -> None:
        self.ocpus_at = ocpus_at
        self.per_ocpu: float | None = None
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def bucket(self, address: str, direction: str) -> TokenBucket | None:
        """The bucket shared by all object reads (``RECEIVE``) or all object writes (``SEND``) of
        the live instance at ``address``, if the networks are capped and there is one there."""
        per_ocpu = self.per_ocpu
        if not per_ocpu:
            return None
        ocpus = self.ocpus_at(address)
        if ocpus is None:
            return None
        rate = per_ocpu * ocpus
        with self._lock:
            bucket = self._buckets.get((address, direction))
            if bucket is None or bucket.rate != rate:
                bucket = self._buckets[(address, direction)] = TokenBucket(rate)
            return bucket

    def passed(self) -> list[dict[str, object]]:
        """Each live bucket's address, direction, rate and the bytes that went through it."""
        with self._lock:
            return [{"address": address, "direction": direction, "rate": bucket.rate, "bytes": bucket.passed}
                    for (address, direction), bucket in sorted(self._buckets.items())]

    def set_rate(self, per_ocpu: float | None) -> None:
        """Cap each instance's object reads, and its object writes apart, at ``per_ocpu`` times its
        OCPUs (None: no cap)."""
        with self._lock:
            self.per_ocpu = per_ocpu
            self._buckets.clear()


class ReadMetrics:
    """Bytes sent and requests served by object reads, per ``namespace/bucket/object``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_read: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    def request(self, key: str) -> None:
        with self.lock:
            self.requests[key] += 1
            self.bytes_read[key] += 0  # an empty object still shows up among the bytes

    def sent(self, key: str, n: int) -> None:
        with self.lock:
            self.bytes_read[key] += n

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {"objectBytesRead": dict(self.bytes_read), "objectReadRequests": dict(self.requests)}

    def reset(self) -> None:
        with self.lock:
            self.bytes_read.clear()
            self.requests.clear()
