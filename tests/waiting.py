"""The one way a test waits: for a condition, polled, with a deadline only a real failure reaches.

A test that sleeps a fixed time and then looks bets that the machine is fast enough; under a
loaded suite it loses now and then. ``wait_for`` returns as soon as the condition holds, so its
deadline can be generous (minutes) at no cost to a passing run, and a failure names what never
happened. A test that checks that something did *not* happen waits for a later event that
can only come after it (a barrier), never for a quiet moment.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Generous: only a real failure waits this long.
DEADLINE = 120.0


def wait_for(condition: Callable[[], T], deadline: float = DEADLINE, what: str = "the condition",
             interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; return that. Fail after ``deadline``
    seconds with ``what`` (a phrase: "the volume AVAILABLE") and the last value seen."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"waited {deadline:.0f}s for {what}; last saw {value!r}")
        time.sleep(interval)


def wait_until_past(moment: dt.datetime | float) -> None:
    """Return once the clock has passed ``moment`` (an aware datetime, or a ``time.monotonic()``
    value): for behaviour that is defined by a time (an expiry, a lifetime), not by an event."""
    if isinstance(moment, dt.datetime):
        wait_for(lambda: dt.datetime.now(dt.timezone.utc) > moment, what=f"the clock past {moment.isoformat()}")
    else:
        wait_for(lambda: time.monotonic() > moment, what="the clock past the moment")


def wait_until(client, response, property: str | None = None, state=None, max_wait_seconds: float = DEADLINE,
               evaluate_response: Callable[[Any], bool] | None = None, **_sdk_tuning: Any) -> Any:
    """``oci.wait_until``'s contract (the response once its ``property`` is ``state``, one of a tuple
    of states, or ``evaluate_response`` holds), polled every 0.05 s. The SDK's waiter sleeps a whole
    second before it looks again (it starts at 1 s whatever ``max_interval_seconds`` says), and on
    the local OCI, whose transitions take 0.05 s, that second was most of many tests' time."""
    def reached(current: Any) -> bool:
        if evaluate_response is not None:
            return evaluate_response(current)
        value = getattr(current.data, property)
        return value in state if isinstance(state, tuple) else value == state

    import oci

    current, end = response, time.monotonic() + max_wait_seconds
    while not reached(current):
        if time.monotonic() >= end:
            raise oci.exceptions.MaximumWaitTimeExceeded(
                f"waited {max_wait_seconds:.0f}s for {property or 'the response'} {state or 'as asked'}")
        time.sleep(0.05)
        # as the SDK's waiter asks again: the same GET, with the SDK's default retries
        current = oci.retry.DEFAULT_RETRY_STRATEGY.make_retrying_call(client.base_client.request, current.request)
    return current
