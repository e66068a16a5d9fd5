"""OCI Function (Fn Project, Python FDK): an Object Storage event in, a Prefect flow run out.

Configuration comes from the function's config (``fn config function <app> <fn> KEY value``),
see README "Upload trigger". The answer is JSON ``{"decision": ..., "reason": ..., "code": ...}`` with
status 200 (started or ignored), 400 (refused: the event or the object's metadata is
invalid) or 502 (no flow run could be created), so the platform can retry and
dead-letter what failed. (The FDK passes 200, 502 and 504 on as they are and any other
status as 200, except to API Gateway, which gets it in ``Fn-Http-Status``: a refusal
reaches Events as a 200 and is not retried.)
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
import time
from typing import Any, Mapping

import httpx
import oci
from fdk import response

# In the function's build directory the modules sit side by side: the build rewrites this import.
from function_trigger.trigger import Decision, PrefectApi, TriggerConfig, handle

_http = httpx.Client(timeout=15.0)
_object_storage: Any = None


def object_storage(config: Mapping[str, str]) -> Any:
    """The Object Storage client: resource principal in OCI, a config file on the local stack."""
    global _object_storage
    if _object_storage is None:
        kwargs: dict[str, Any] = {}
        if config.get("OCI_ENDPOINT"):
            kwargs["service_endpoint"] = config["OCI_ENDPOINT"]
        if config.get("OCI_AUTH", "resource_principal") == "resource_principal":
            signer = oci.auth.signers.get_resource_principals_signer()
            _object_storage = oci.object_storage.ObjectStorageClient({"region": signer.region}, signer=signer, **kwargs)
        else:
            sdk_config = oci.config.from_file(config.get("OCI_CONFIG_FILE", "~/.oci/config"),
                                              config.get("OCI_PROFILE", "DEFAULT"))
            _object_storage = oci.object_storage.ObjectStorageClient(sdk_config, **kwargs)
    return _object_storage


def head_object(config: Mapping[str, str]):
    def head(namespace: str, bucket: str, name: str) -> Mapping[str, str]:
        try:
            return object_storage(config).head_object(namespace, bucket, name).headers
        except oci.exceptions.ServiceError as exc:
            if exc.status == 404:  # HEAD 404s carry no error code
                raise LookupError(f"{namespace}/{bucket}/{name} does not exist") from None
            raise
    return head


def seconds_left(deadline: str | None, default: float) -> float:
    if not deadline:
        return default
    try:
        end = dt.datetime.fromisoformat(deadline.replace("Z", "+00:00"))
    except ValueError:
        return default
    # The platform's deadline is the function's own timeout (func.yaml): all of it is the budget.
    return max(1.0, (end - dt.datetime.now(dt.timezone.utc)).total_seconds() - 2.0)


def handler(ctx: Any, data: io.BytesIO | None = None) -> response.Response:
    config = dict(ctx.Config())
    raw = data.getvalue() if data is not None else b""
    try:
        settings = TriggerConfig.from_mapping(config)
    except (ValueError, TypeError) as exc:
        decision = Decision("failed", f"function configuration is invalid: {exc}", "invalid-configuration")
    else:
        budget = seconds_left(ctx.Deadline(), settings.timeout_seconds)
        api = PrefectApi(settings, client=_http, deadline=time.monotonic() + budget)
        try:
            decision = handle(raw, settings, head_object(config), api)
        except Exception as exc:  # an unexpected error still gets an answer and a log line
            decision = Decision("failed", f"{type(exc).__name__}: {exc}", "unexpected-error")
    # One structured line per event; no secret is part of a Decision.
    print(json.dumps({"call_id": ctx.CallID(), **decision.as_dict()}), file=sys.stderr, flush=True)
    return response.Response(ctx, response_data=json.dumps(decision.as_dict()),
                             headers={"Content-Type": "application/json"}, status_code=decision.status)
