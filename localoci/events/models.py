"""Events: what a service publishes (Object Storage: object creates, updates and deletes) becomes
OCI-shaped CloudEvents delivered to rules.

A rule has an HTTP endpoint, an OCI rule condition and a payload version. Each
matching event is written to a durable outbox before delivery and removed only
after the endpoint answered 2xx, so delivery is at least once, across restarts.
Failed deliveries are retried with capped exponential backoff; after
``max_attempts`` the event moves to the dead letters, visible in the admin API.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..errors import invalid_parameter, not_found
from ..ids import new_ocid, now_iso

if TYPE_CHECKING:
    from ..app import LocalOCI

log = logging.getLogger("localoci.events")

EVENT_VERSIONS = ("1.0", "2.0")


def condition_matches(condition: Any, event: Any) -> bool:
    """OCI rule condition semantics: every key must match; a list matches any of its items;
    strings may use ``*`` wildcards."""
    if isinstance(condition, dict):
        if not isinstance(event, dict):
            return False
        return all(condition_matches(v, event.get(k)) for k, v in condition.items())
    if isinstance(condition, list):
        return any(condition_matches(c, event) for c in condition)
    if event is None:
        return False
    # Only ``*`` is a wildcard in OCI conditions: ``?`` and ``[...]`` match themselves.
    pattern = ".*".join(re.escape(part) for part in str(condition).split("*"))
    return re.fullmatch(pattern, str(event), re.DOTALL) is not None


class Events:
    def __init__(self, app: "LocalOCI", max_attempts: int = 20, max_backoff: float = 30.0) -> None:
        self.app = app
        self.store = app.store
        self.rules = self.store.collection("event_rules")
        self.outbox = self.store.collection("event_outbox")
        self.dead_letters = self.store.collection("event_dead_letters")
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff
        self._in_flight: set[str] = set()
        self._wake = threading.Event()
        self._stopped = False
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="localoci-event")
        self._thread = threading.Thread(target=self._loop, name="localoci-events", daemon=True)
        self.delivered = 0

    # -- rules -------------------------------------------------------------------

    def create_rule(self, spec: dict[str, Any]) -> dict[str, Any]:
        endpoint = spec.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise invalid_parameter("endpoint must be an http(s) URL.")
        version = str(spec.get("eventVersion", "1.0"))
        if version not in EVENT_VERSIONS:
            raise invalid_parameter(f"eventVersion must be one of {EVENT_VERSIONS}.")
        condition = spec.get("condition") or {}
        if isinstance(condition, str):
            try:
                condition = json.loads(condition)
            except ValueError:
                raise invalid_parameter("condition must be JSON.") from None
        if not isinstance(condition, dict):
            raise invalid_parameter("condition must be a JSON object.")
        rule = {
            "id": new_ocid("eventrule"),
            "displayName": str(spec.get("displayName") or "rule"),
            "endpoint": endpoint,
            "condition": condition,
            "eventVersion": version,
            "isEnabled": bool(spec.get("isEnabled", True)),
            "timeCreated": now_iso(),
        }
        with self.store.lock:
            self.rules[rule["id"]] = rule
            self.store.save()
        return rule

    def delete_rule(self, rule_id: str) -> None:
        with self.store.lock:
            if self.rules.pop(rule_id, None) is None:
                raise not_found(f"Rule {rule_id}")
            for key in [k for k, d in self.outbox.items() if d["ruleId"] == rule_id]:
                del self.outbox[key]
            self.store.save()

    def list_rules(self) -> list[dict[str, Any]]:
        return list(self.store.values("event_rules"))

    def status(self) -> dict[str, Any]:
        """Deliveries made, pending and given up (the dead letters)."""
        return {
            "delivered": self.delivered,
            "pending": list(self.store.values("event_outbox")),
            "deadLetters": list(self.store.values("event_dead_letters")),
        }

    # -- events ------------------------------------------------------------------

    def publish(self, source: str, event_type: str, data: dict[str, Any]) -> None:
        """Queue an event of ``source`` (a service: ``ObjectStorage``) for every enabled rule whose
        condition it matches (under the store lock)."""
        event_id = str(uuid.uuid4())
        time_ = now_iso()
        queued = False
        v1 = self._v1(source, event_type, event_id, time_, data)
        for rule in self.rules.values():
            if not rule["isEnabled"] or not condition_matches(rule["condition"], v1):
                continue
            payload = self._payload(rule["eventVersion"], source, event_type, event_id, time_, data)
            delivery_id = uuid.uuid4().hex
            self.outbox[delivery_id] = {"ruleId": rule["id"], "event": payload, "attempts": 0, "nextAt": 0.0, "lastError": None}
            queued = True
        if queued:
            self.store.save()
            self._wake.set()

    @staticmethod
    def _v1(source: str, event_type: str, event_id: str, time_: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "eventType": event_type,
            "cloudEventsVersion": "0.1",
            "eventTypeVersion": "2.0",
            "source": source,
            "eventID": event_id,
            "eventTime": time_,
            "contentType": "application/json",
            "extensions": {"compartmentId": data["compartmentId"]},
            "data": data,
        }

    def _payload(self, version: str, source: str, event_type: str, event_id: str, time_: str,
                 data: dict[str, Any]) -> dict[str, Any]:
        if version == "1.0":
            return self._v1(source, event_type, event_id, time_, data)
        return {
            "specversion": "1.0",
            "type": event_type,
            "source": source,
            "id": event_id,
            "time": time_,
            "datacontenttype": "application/json",
            "compartmentid": data["compartmentId"],
            "data": data,
        }

    # -- delivery ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stopped:
            now = time.time()
            next_due = now + 1.0
            with self.store.lock:
                due = []
                for key, delivery in self.outbox.items():
                    if key in self._in_flight:
                        continue
                    if delivery["nextAt"] <= now:
                        due.append(key)
                    else:
                        next_due = min(next_due, delivery["nextAt"])
                self._in_flight.update(due)
            for key in due:
                try:
                    self._pool.submit(self._deliver, key)
                except RuntimeError:  # the pool shut down: the server is stopping
                    return
            self._wake.wait(max(0.0, next_due - time.time()))
            self._wake.clear()

    def _deliver(self, key: str) -> None:
        try:
            with self.store.lock:
                delivery = self.outbox.get(key)
                rule = self.rules.get(delivery["ruleId"]) if delivery else None
            if delivery is None or rule is None:
                return
            error = self._post(rule["endpoint"], delivery["event"])
            with self.store.lock:
                if key not in self.outbox:
                    return
                if error is None:
                    del self.outbox[key]
                    self.delivered += 1
                else:
                    delivery["attempts"] += 1
                    delivery["lastError"] = error
                    if delivery["attempts"] >= self.max_attempts:
                        self.dead_letters[key] = self.outbox.pop(key)
                        log.warning("event %s dead-lettered after %d attempts: %s", key, delivery["attempts"], error)
                    else:
                        delivery["nextAt"] = time.time() + min(self.max_backoff, 0.2 * 2 ** delivery["attempts"])
                self.store.save()
        finally:
            with self.store.lock:
                self._in_flight.discard(key)
            self._wake.set()

    @staticmethod
    def _post(endpoint: str, event: dict[str, Any]) -> str | None:
        """POST one event; None on a 2xx answer, else what went wrong."""
        request = urllib.request.Request(
            endpoint,
            data=json.dumps(event).encode(),
            headers={"Content-Type": "application/cloudevents+json" if "specversion" in event else "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                reply.read()
                return None
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
