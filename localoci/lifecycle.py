"""Timed lifecycle transitions (PROVISIONING -> AVAILABLE, ATTACHING -> ATTACHED, ...).

Models ask the :class:`Scheduler` to run a transition after a delay. The delay of a
transition is the default plus any latency an operator injected for it through
``/_localoci/latency``; keys are ``<kind>:<TARGET_STATE>`` such as
``instance:RUNNING``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("localoci.lifecycle")


class Scheduler:
    def __init__(self, default_delay: float = 0.05) -> None:
        self.default_delay = default_delay
        self.latency: dict[str, float] = {}
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="localoci-lifecycle", daemon=True)
        self._thread.start()

    def delay_for(self, transition: str) -> float:
        return self.default_delay + self.latency.get(transition, 0.0)

    def transition(self, transition: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the delay of ``transition`` has passed."""
        self.call_later(self.delay_for(transition), fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._counter), fn))
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cv.wait(timeout)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            # Each transition runs on its own thread: starting an sshd must not hold up
            # a volume becoming AVAILABLE.
            threading.Thread(target=self._call, args=(fn,), daemon=True).start()

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("lifecycle transition failed")
