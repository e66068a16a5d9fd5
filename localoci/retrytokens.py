"""Retry tokens (``opc-retry-token``): a create sent again with its token creates nothing new.

OCI takes a token of up to 64 characters on its creates (and some actions). For 24 hours,
a request that repeats a token with the same operation and parameters gets the first
call's reply again, and a request that reuses it for anything else is refused with 409.
A client whose reply was lost (a timeout, a 500, a dropped connection) can thus send the
create again and still end up with exactly one resource.

Only the operations whose OCI API takes a token honour it (a route's ``retry_token``);
Object Storage and backup policy assignments take none, and the SDK sends none to them.

The first successful reply of each token is kept in the store, so a restart forgets none,
and replayed as it was: status, headers and body, the reply the client lost, with the
resource as it was then (a client polls it for its state anyway). A call that failed
created nothing and is not kept: sent again, it runs afresh. Calls with one token run one
at a time, so two sent at once still create one resource.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import conflict, invalid_parameter
from .http import Request, Response
from .store import Store

HEADER = "opc-retry-token"
MAX_LENGTH = 64
TTL_SECONDS = 24 * 3600


def fingerprint(request: Request) -> str:
    """What a retry must repeat: path, query and JSON body, whatever the order of their keys."""
    canonical = {"path": request.raw_path, "query": request.query, "body": request.json()}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RetryTokens:
    def __init__(self, store: Store, ttl_seconds: float = TTL_SECONDS) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.tokens = store.collection("retry_tokens")
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._locks_guard = threading.Lock()

    def once(self, token: str, operation: str, request: Request, handler: Callable[[Request], Response]) -> Response:
        """The reply of ``handler`` for the first call with ``token``; that same reply for its retries."""
        if not 1 <= len(token) <= MAX_LENGTH:
            raise invalid_parameter(f"{HEADER} must be 1 to {MAX_LENGTH} characters long, not {len(token)}.")
        digest = fingerprint(request)
        with self._holding(token):
            seen = self._live(token)
            if seen is not None:
                if (seen["operation"], seen["fingerprint"]) != (operation, digest):
                    raise conflict(f"The retry token was used by an earlier {seen['operation']} request with other "
                                   "parameters; send a new token to make a new request.")
                return Response(seen["status"], seen["body"].encode(), dict(seen["headers"]))
            response = handler(request)
            if 200 <= response.status < 300 and isinstance(response.body, bytes):
                self._record(token, operation, digest, response, response.body)
            return response

    def _live(self, token: str) -> dict[str, Any] | None:
        with self.store.lock:
            seen = self.tokens.get(token)
            return seen if seen is not None and seen["expires"] > time.time() else None

    def _record(self, token: str, operation: str, digest: str, response: Response, body: bytes) -> None:
        now = time.time()
        with self.store.lock:
            for stale in [t for t, seen in self.tokens.items() if seen["expires"] <= now]:
                del self.tokens[stale]
            self.tokens[token] = {
                "operation": operation, "fingerprint": digest, "expires": now + self.ttl_seconds,
                "status": response.status, "headers": response.headers, "body": body.decode(),
            }
            self.store.save()

    @contextmanager
    def _holding(self, token: str) -> Iterator[None]:
        """Hold the lock of ``token``; it lives only while some call holds or awaits it."""
        with self._locks_guard:
            lock, users = self._locks.get(token, (threading.Lock(), 0))
            self._locks[token] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._locks_guard:
                lock, users = self._locks[token]
                if users == 1:
                    del self._locks[token]
                else:
                    self._locks[token] = (lock, users - 1)
