"""The operator and test surface under ``/_localoci/``: inventory, faults, latency, bandwidth, metrics, events, health.

It is not part of OCI and takes no signature; the server listens on loopback only. The route
table (``ROUTES``) at the bottom says which call each handler serves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from . import latency
from .blockstorage.models import MIN_SIZE_GB, set_min_size
from .errors import invalid_parameter
from .http import Handler, Request, Response, Route
from .resources import public

if TYPE_CHECKING:
    from .app import LocalOCI

ADMIN = "/_localoci"
ENDED = ("TERMINATED", "DETACHED")
# What the inventory lists, in this order, after the namespace.
INVENTORY = ("instances", "volumes", "bootVolumes", "volumeGroups", "volumeBackups", "bootVolumeBackups",
             "volumeGroupBackups", "attachments", "bootVolumeAttachments", "pars", "backupPolicyAssignments",
             "multipartUploads")
# Bandwidth caps: on object reads, each connection's own; on an instance's network (times its OCPUs),
# its object reads and, apart, its object writes. The second keeps the name it has always had in this
# API, which the benchmark and the fleet run set.
PER_CONNECTION = "objectReadBytesPerSecondPerConnection"
PER_OCPU = "workerBytesPerSecondPerOcpu"


def _tags_match(record: dict[str, Any], tags: dict[str, str]) -> bool:
    return all(record.get("freeformTags", {}).get(k) == v for k, v in tags.items())


def inventory(app: "LocalOCI", include_ended: bool = False, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Every resource the local OCI holds, live ones only unless ``include_ended``; of those that carry
    tags, only those with ``tags``. Each service lists its own."""
    tags = tags or {}

    def shown(record: dict[str, Any]) -> bool:
        return include_ended or record["lifecycleState"] not in ENDED

    def wanted(record: dict[str, Any]) -> bool:
        return shown(record) and _tags_match(record, tags)

    found = {
        **app.compute.inventory(wanted, shown),
        **app.blockstorage.inventory(wanted),
        **app.backups.inventory(wanted),
        **app.objectstorage.inventory(),
    }
    return {"namespace": app.namespace, **{kind: found[kind] for kind in INVENTORY}}


def _spec(request: Request) -> dict[str, Any]:
    """The JSON object a request carries; anything else is refused."""
    spec = request.json()
    if not isinstance(spec, dict):
        raise invalid_parameter("the request body must be a JSON object.")
    return spec


def get_inventory(app: "LocalOCI", request: Request) -> Response:
    tags = {k[4:]: v for k, v in request.query.items() if k.startswith("tag.")}
    include_ended = request.query.get("all", "").lower() in ("1", "true", "yes")
    return Response.json(inventory(app, include_ended, tags))


def health(app: "LocalOCI", request: Request) -> Response:
    return Response.json({"status": "ok", "namespace": app.namespace, "tenancyId": app.tenancy_id,
                          "sshPort": app.meta["ssh_port"]})


def set_limits(app: "LocalOCI", request: Request) -> Response:
    return Response.json(set_min_size(request.json().get("minVolumeSizeInGBs", MIN_SIZE_GB)))


def add_fault(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.faults.add(_spec(request)).__dict__, status=201)


def list_faults(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.faults.list())


def clear_faults(app: "LocalOCI", request: Request) -> Response:
    app.faults.clear()
    return Response.empty()


def set_latency(app: "LocalOCI", request: Request) -> Response:
    spec = _spec(request)
    transition, seconds = spec.get("transition"), spec.get("seconds")
    if not isinstance(transition, str) or ":" not in transition:
        raise invalid_parameter("transition must look like 'instance:RUNNING' or 'volume:AVAILABLE'.")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise invalid_parameter("seconds must be a number of seconds, at least 0.")
    app.scheduler.latency[transition] = float(seconds)
    return Response.json(app.scheduler.latency)


def set_latency_profile(app: "LocalOCI", request: Request) -> Response:
    """Replace every transition's latency with a profile's (``localoci/latency.py``)."""
    name = _spec(request).get("profile")
    try:
        chosen = latency.profile(name if isinstance(name, str) else "")
    except ValueError as exc:
        raise invalid_parameter(str(exc)) from None
    app.scheduler.latency.clear()
    app.scheduler.latency.update(chosen)
    return Response.json(app.scheduler.latency)


def get_latency(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.scheduler.latency)


def clear_latency(app: "LocalOCI", request: Request) -> Response:
    app.scheduler.latency.clear()
    return Response.empty()


def crash_instance(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.crash(request.params["instanceId"])))


def _bandwidth(app: "LocalOCI") -> dict[str, float | None]:
    return {PER_CONNECTION: app.read_bps_per_connection, PER_OCPU: app.instance_networks.per_ocpu}


def set_bandwidth(app: "LocalOCI", request: Request) -> Response:
    spec = _spec(request)
    unknown = sorted(set(spec) - {PER_CONNECTION, PER_OCPU})
    if unknown:
        raise invalid_parameter(f"unknown bandwidth setting(s) {', '.join(unknown)}; "
                                f"known are {PER_CONNECTION} and {PER_OCPU}.")
    for key, rate in spec.items():
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not math.isfinite(rate) or rate <= 0):
            raise invalid_parameter(f"{key} must be a positive number or null.")
    if PER_CONNECTION in spec:
        app.read_bps_per_connection = spec[PER_CONNECTION]
    if PER_OCPU in spec:
        app.instance_networks.set_rate(spec[PER_OCPU])
    return Response.json(_bandwidth(app))


def get_bandwidth(app: "LocalOCI", request: Request) -> Response:
    """The caps, and the bytes each instance network's bucket has let through since they were set."""
    return Response.json({**_bandwidth(app), "instanceNetworks": app.instance_networks.passed()})


def get_metrics(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.read_metrics.snapshot())


def reset_metrics(app: "LocalOCI", request: Request) -> Response:
    app.read_metrics.reset()
    return Response.empty()


def create_rule(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.events.create_rule(_spec(request)), status=201)


def list_rules(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.events.list_rules())


def delete_rule(app: "LocalOCI", request: Request) -> Response:
    app.events.delete_rule(request.params["ruleId"])
    return Response.empty()


def event_status(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.events.status())


def _admin(method: str, path: str, handler: Handler, operation: str) -> Route:
    """A row of the admin table: under ``/_localoci``, and taking no signature."""
    return Route(method, ADMIN + path, handler, operation, authenticated=False)


ROUTES = [
    _admin("GET", "/health", health, "AdminHealth"),
    _admin("GET", "/inventory", get_inventory, "AdminInventory"),
    _admin("POST", "/limits", set_limits, "AdminSetLimits"),
    _admin("POST", "/faults", add_fault, "AdminAddFault"),
    _admin("GET", "/faults", list_faults, "AdminListFaults"),
    _admin("DELETE", "/faults", clear_faults, "AdminClearFaults"),
    _admin("POST", "/latency", set_latency, "AdminSetLatency"),
    _admin("GET", "/latency", get_latency, "AdminGetLatency"),
    _admin("POST", "/latency/profile", set_latency_profile, "AdminSetLatencyProfile"),
    _admin("DELETE", "/latency", clear_latency, "AdminClearLatency"),
    _admin("POST", "/instances/{instanceId}/crash", crash_instance, "AdminCrashInstance"),
    _admin("POST", "/bandwidth", set_bandwidth, "AdminSetBandwidth"),
    _admin("GET", "/bandwidth", get_bandwidth, "AdminGetBandwidth"),
    _admin("GET", "/metrics", get_metrics, "AdminGetMetrics"),
    _admin("DELETE", "/metrics", reset_metrics, "AdminResetMetrics"),
    _admin("POST", "/events/rules", create_rule, "AdminCreateRule"),
    _admin("GET", "/events/rules", list_rules, "AdminListRules"),
    _admin("DELETE", "/events/rules/{ruleId}", delete_rule, "AdminDeleteRule"),
    _admin("GET", "/events", event_status, "AdminEventStatus"),
]
