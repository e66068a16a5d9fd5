"""From an Object Storage event to a Prefect flow run: parse, filter, validate, start.

Kept apart from the FDK handler (``func.py``) so it runs and is tested as plain Python.
Every event gets one :class:`Decision`: ``started`` (a flow run exists for the object
version, new or already there), ``ignored`` (not for us: another event type, bucket,
prefix or suffix), ``refused`` (malformed or invalid; nothing started) or ``failed`` (no
flow run could be created). Each but ``started`` carries a stable ``code`` besides its
prose ``reason``: for invalid metadata the contract's own (``invalid-ad-number``, ...);
otherwise refused ``invalid-event``, ``object-gone``, ``no-etag``; ignored ``not-an-upload``,
``not-watched``, ``prefix-mismatch``, ``not-an-image`` (neither an image nor a machine),
``superseded``; failed
``prefect-unavailable`` (and, from ``func.py``, ``invalid-configuration``,
``unexpected-error``).
"""

from __future__ import annotations

import base64
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import httpx

# In the function's build directory contract.py sits beside this file: the build rewrites this import.
from diskimport.contract import (IMAGE_SUFFIXES, MACHINE_SUFFIXES, Refusal, idempotency_key, parse_machine_options,
                                 parse_options)

ACTED_ON = {"com.oraclecloud.objectstorage.createobject", "com.oraclecloud.objectstorage.updateobject"}
RETRYABLE = {429, 500, 502, 503, 504}


class EventRefused(Refusal):
    """The event cannot be acted on; the message says why."""

    default_code = "invalid-event"


class PrefectUnavailable(Exception):
    """No flow run could be created (after retries, or for a reason retrying cannot fix)."""


@dataclass(frozen=True)
class ObjectEvent:
    event_id: str
    event_type: str
    namespace: str
    bucket: str
    object_name: str
    etag: str | None


@dataclass
class Decision:
    decision: str  # started | ignored | refused | failed
    reason: str
    code: str | None = None  # stable, for programs (the reason is prose)
    event_id: str | None = None
    object: str | None = None
    flow_run_id: str | None = None
    created: bool | None = None

    @property
    def status(self) -> int:
        return {"started": 200, "ignored": 200, "refused": 400}.get(self.decision, 502)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class TriggerConfig:
    """Function configuration (``fn config`` keys, see README)."""

    prefect_api_url: str
    deployment: str = "import-virtual-disk/default"
    machine_deployment: str = "import-machine/default"          # for .ova, .ovf and *.machine.json
    auth_string: str | None = field(default=None, repr=False)  # self-hosted: "user:password" (HTTP basic)
    api_key: str | None = field(default=None, repr=False)      # Prefect Cloud: bearer API key
    buckets: tuple[str, ...] = ()                               # empty: every bucket
    prefix: str = ""
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES
    machine_suffixes: tuple[str, ...] = MACHINE_SUFFIXES
    ad_count: int = 3
    flow_parameters: Mapping[str, Any] = field(default_factory=dict)  # e.g. block names
    timeout_seconds: float = 60.0

    @classmethod
    def from_mapping(cls, config: Mapping[str, str]) -> "TriggerConfig":
        def listed(key: str) -> tuple[str, ...]:
            return tuple(s.strip() for s in config.get(key, "").split(",") if s.strip())

        url = config.get("PREFECT_API_URL", "").rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError("PREFECT_API_URL must be set to the Prefect API URL (http(s)://.../api)")
        extra = json.loads(config.get("FLOW_PARAMETERS", "{}") or "{}")
        if not isinstance(extra, dict):
            raise ValueError("FLOW_PARAMETERS must be a JSON object")
        return cls(
            prefect_api_url=url,
            deployment=config.get("PREFECT_DEPLOYMENT", cls.deployment),
            machine_deployment=config.get("PREFECT_MACHINE_DEPLOYMENT", cls.machine_deployment),
            auth_string=config.get("PREFECT_API_AUTH_STRING") or None,
            api_key=config.get("PREFECT_API_KEY") or None,
            buckets=listed("WATCH_BUCKETS"),
            prefix=config.get("NAME_PREFIX", ""),
            suffixes=tuple(s.lower() for s in listed("IMAGE_SUFFIXES")) or IMAGE_SUFFIXES,
            machine_suffixes=(tuple(s.lower() for s in listed("MACHINE_SUFFIXES")) or MACHINE_SUFFIXES)
            if config.get("MACHINE_SUFFIXES") != "none" else (),
            ad_count=int(config.get("AD_COUNT", "3")),
            flow_parameters=extra,
            timeout_seconds=float(config.get("TIMEOUT_SECONDS", "60")),
        )


def parse_event(raw: bytes | str) -> ObjectEvent:
    """Read an OCI Object Storage event in either payload shape OCI emits.

    eventVersion 1.0 (``eventType``, ``eventID``, ``data``) and CloudEvents 1.0
    (``specversion``, ``type``, ``id``, ``data``).
    """
    try:
        event = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventRefused(f"the event is not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise EventRefused("the event is not a JSON object")
    event_type = event.get("eventType") or event.get("type")
    event_id = event.get("eventID") or event.get("id")
    data = event.get("data")
    if not isinstance(event_type, str) or not event_type:
        raise EventRefused("the event has no eventType (or CloudEvents type)")
    if not isinstance(data, dict):
        raise EventRefused("the event has no data object")
    details = data.get("additionalDetails") or {}
    if not isinstance(details, dict):
        raise EventRefused("data.additionalDetails is not an object")
    name = data.get("resourceName")
    namespace = details.get("namespace")
    bucket = details.get("bucketName")
    for label, value in (("data.resourceName (the object name)", name),
                         ("data.additionalDetails.namespace", namespace),
                         ("data.additionalDetails.bucketName", bucket)):
        if not isinstance(value, str) or not value:
            raise EventRefused(f"the event is missing {label}")
    etag = details.get("eTag")
    return ObjectEvent(str(event_id or ""), event_type, namespace, bucket, name, etag if isinstance(etag, str) else None)


def not_for_us(event: ObjectEvent, config: TriggerConfig) -> tuple[str, str] | None:
    """Why this event starts nothing, as ``(code, reason)``, or None when it should start an import."""
    if event.event_type not in ACTED_ON:
        return "not-an-upload", f"event type {event.event_type} is not an object create or update"
    if config.buckets and event.bucket.lower() not in {b.lower() for b in config.buckets}:
        return "not-watched", f"bucket {event.bucket} is not watched"
    if config.prefix and not event.object_name.lower().startswith(config.prefix.lower()):
        return "prefix-mismatch", f"object name does not start with {config.prefix!r}"
    if not event.object_name.lower().endswith(config.suffixes + config.machine_suffixes):
        return "not-an-image", ("object name does not end with an image or machine suffix ("
                                + ", ".join(config.suffixes + config.machine_suffixes) + ")")
    return None


class PrefectApi:
    """The few Prefect REST calls the trigger needs, with auth and backoff."""

    def __init__(self, config: TriggerConfig, client: httpx.Client | None = None, deadline: float | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        elif config.auth_string:
            headers["Authorization"] = "Basic " + base64.b64encode(config.auth_string.encode()).decode()
        self.config = config
        self.client = client or httpx.Client(timeout=15.0)
        self.headers = headers
        self.deadline = deadline or time.monotonic() + config.timeout_seconds
        self.sleep = sleep

    def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = self.client.request(method, self.config.prefect_api_url + path, json=body,
                                            headers=self.headers)
                problem = None if reply.status_code not in RETRYABLE else f"HTTP {reply.status_code}"
            except httpx.TransportError as exc:
                reply, problem = None, f"{type(exc).__name__}: {exc}"
            if problem is None:
                assert reply is not None
                if reply.status_code in (401, 403):
                    raise PrefectUnavailable(f"the Prefect API refused the credentials (HTTP {reply.status_code}); "
                                             "check PREFECT_API_AUTH_STRING or PREFECT_API_KEY")
                return reply
            delay = random.uniform(0, min(8.0, 0.25 * 2 ** attempt))  # full jitter, capped
            if time.monotonic() + delay >= self.deadline:
                raise PrefectUnavailable(f"the Prefect API did not accept {method} {path} before the deadline "
                                         f"({attempt} attempts, last: {problem})")
            self.sleep(delay)

    def deployment_id(self, deployment: str | None = None) -> str:
        deployment = deployment or self.config.deployment
        flow_name, _, deployment_name = deployment.partition("/")
        reply = self._request("GET", f"/deployments/name/{flow_name}/{deployment_name}")
        if reply.status_code == 404:
            raise PrefectUnavailable(f"deployment {deployment!r} does not exist")
        if reply.status_code != 200:
            raise PrefectUnavailable(f"reading deployment {deployment!r} failed: HTTP {reply.status_code}")
        return reply.json()["id"]

    def create_flow_run(self, deployment_id: str, parameters: dict[str, Any], key: str,
                        tags: list[str]) -> tuple[str, bool]:
        body = {"parameters": parameters, "idempotency_key": key, "tags": tags}
        reply = self._request("POST", f"/deployments/{deployment_id}/create_flow_run", body)
        if reply.status_code not in (200, 201):
            raise PrefectUnavailable(f"creating the flow run failed: HTTP {reply.status_code}: {reply.text[:500]}")
        return reply.json()["id"], reply.status_code == 201


HeadObject = Callable[[str, str, str], Mapping[str, str]]  # (namespace, bucket, object) -> headers


def handle(raw: bytes | str, config: TriggerConfig, head_object: HeadObject, api: PrefectApi) -> Decision:
    """Decide what to do with one event and, when it is an image upload, start its import."""
    try:
        event = parse_event(raw)
    except EventRefused as exc:
        return Decision("refused", exc.message, exc.code)
    base = {"event_id": event.event_id, "object": f"{event.namespace}/{event.bucket}/{event.object_name}"}
    ignored = not_for_us(event, config)
    if ignored:
        code, reason = ignored
        return Decision("ignored", reason, code, **base)
    try:
        headers = {k.lower(): v for k, v in head_object(event.namespace, event.bucket, event.object_name).items()}
    except LookupError as exc:
        return Decision("refused", f"the object is gone: {exc}", "object-gone", **base)
    etag = headers.get("etag") or event.etag
    if not etag:
        return Decision("refused", "neither the event nor the object has an ETag", "no-etag", **base)
    if event.etag and headers.get("etag") and headers["etag"] != event.etag:
        return Decision("ignored", f"the object changed since the event (ETag {headers['etag']}, event "
                        f"{event.etag}); its own event starts that version", "superseded", **base)
    parameters = {**config.flow_parameters, "namespace": event.namespace, "bucket": event.bucket,
                  "object_name": event.object_name, "etag": etag}
    machine = event.object_name.lower().endswith(config.machine_suffixes) if config.machine_suffixes else False
    # A disk's options travel as its metadata. A machine's disks take the defaults; its own options
    # (bootable, launch) are its metadata, or the machine deployment's defaults where it has none.
    metadata = {k[len("opc-meta-"):]: v for k, v in headers.items() if k.startswith("opc-meta-")}
    try:
        if machine:
            parameters.update(parse_machine_options(metadata))
        else:
            parameters.update(parse_options(metadata, ad_count=config.ad_count).as_parameters())
    except Refusal as exc:
        return Decision("refused", f"invalid object metadata: {exc.message}", exc.code, **base)
    key = idempotency_key(event.namespace, event.bucket, event.object_name, etag)
    deployment = config.machine_deployment if machine else config.deployment
    try:
        flow_run_id, created = api.create_flow_run(api.deployment_id(deployment), parameters, key,
                                                   ["oci-disk-import", "upload-trigger"])
    except PrefectUnavailable as exc:
        return Decision("failed", str(exc), "prefect-unavailable", **base)
    return Decision("started", "flow run created" if created else "flow run already existed for this version",
                    flow_run_id=flow_run_id, created=created, **base)
