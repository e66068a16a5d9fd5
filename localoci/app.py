"""The local OCI application: the services, their shared state and the request pipeline."""

from __future__ import annotations

import functools
import logging
import secrets
from pathlib import Path
from typing import Any

from . import admin
from .bandwidth import RECEIVE, SEND, InstanceNetworks, ReadMetrics, TokenBucket
from .blockstorage.backups import Backups
from .blockstorage.models import BlockStorage
from .blockstorage import responses as blockstorage_responses
from .compute.models import Compute
from .compute import responses as compute_responses
from .errors import ServiceError
from .events.models import Events
from .faults import AFTER, BEFORE, Fault, FaultInjector
from .http import Request, Response, Router
from .identity.models import Identity
from .identity import responses as identity_responses
from .lifecycle import Scheduler
from .network.models import Network
from .network import responses as network_responses
from .objectstorage.models import ObjectStorage
from .objectstorage import responses as objectstorage_responses
from .regions import HOME
from .retrytokens import HEADER as RETRY_TOKEN, RetryTokens
from .server import LocalOCIServer, require_signature
from .store import Store

log = logging.getLogger("localoci")


class LocalOCI:
    """All services of the local OCI over one data directory."""

    def __init__(
        self,
        data_dir: Path,
        ssh_port: int | None = None,
        transition_seconds: float = 0.05,
        regions: list[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.store = Store(self.data_dir)
        meta = self.store.collection("meta")
        with self.store.lock:
            meta.setdefault("namespace", "local" + secrets.token_hex(4))
            meta.setdefault("tenancy_id", "ocid1.tenancy.oc1..local" + secrets.token_hex(12))
            if ssh_port is not None:
                meta["ssh_port"] = ssh_port
            meta.setdefault("ssh_port", 22)
            # The regions served: as told, else as the last process served them, else the home region alone.
            if regions:
                meta["regions"] = list(regions)
            meta.setdefault("regions", [HOME])
            self.store.save()
        self.meta = meta
        self.scheduler = Scheduler(transition_seconds)
        self.faults = FaultInjector()
        self.retry_tokens = RetryTokens(self.store)
        self.read_bps_per_connection: float | None = None
        self.instance_networks = InstanceNetworks(lambda address: self.compute.ocpus_at(address))
        self.read_metrics = ReadMetrics()
        self.identity = Identity(self)
        self.network = Network(self)
        self.events = Events(self)
        self.objectstorage = ObjectStorage(self)
        self.blockstorage = BlockStorage(self)
        self.backups = Backups(self)
        self.compute = Compute(self)
        self.router = Router([
            *objectstorage_responses.ROUTES,
            *identity_responses.ROUTES,
            *network_responses.ROUTES,
            *blockstorage_responses.ROUTES,
            *compute_responses.ROUTES,
            *admin.ROUTES,
        ])

    @property
    def namespace(self) -> str:
        return self.meta["namespace"]

    @property
    def tenancy_id(self) -> str:
        return self.meta["tenancy_id"]

    @property
    def regions(self) -> list[str]:
        """The regions served, the home region first."""
        return list(self.meta["regions"])

    @property
    def home_region(self) -> str:
        return self.meta["regions"][0]

    def start(self) -> None:
        """Bring back what a previous process left: running instances, pending events."""
        self.compute.resume()
        self.blockstorage.resume()
        self.backups.resume()
        self.events.start()

    def stop(self) -> None:
        self.events.stop()
        self.compute.shutdown()
        self.scheduler.stop()

    def handle(self, request: Request) -> Response:
        """Route and authenticate a call; run it (or replay it, by its retry token) between its faults."""
        matched = self.router.match(request.method, request.raw_path)
        if matched is None:
            raise ServiceError(404, "NotFound", f"No API serves {request.method} {request.raw_path}")
        route, params = matched
        request.params = params
        if route.authenticated:
            require_signature(request)
        fault = self._take_fault(route.operation, request)
        if fault is not None:
            request.cut_after_bytes = fault.cut_after_bytes
            request.fail_resource = fault.fail_resource
            fault.strike(BEFORE)
        token = request.headers.get(RETRY_TOKEN) if route.retry_token else None
        if token is None:
            response = route.handler(self, request)
        else:
            # Kept before an after-fault strikes: a retry with the token gets what this call did.
            response = self.retry_tokens.once(token, route.operation, request, functools.partial(route.handler, self))
        if fault is not None:
            fault.strike(AFTER)
        return response

    def _take_fault(self, operation: str, request: Request) -> Fault | None:
        if not self.faults.wanted(operation):
            return None
        fields: dict[str, Any] = {"region": request.region, **request.query, **request.params}
        body = request.json_if_small()
        if isinstance(body, dict):
            fields.update(body)
        return self.faults.take(operation, fields)

    def read_throttles(self, request: Request) -> list[TokenBucket]:
        """Token buckets an object read on this connection must pass through."""
        buckets: list[TokenBucket] = []
        rate = self.read_bps_per_connection
        if rate:
            bucket = request.connection.get("read_bucket")
            if not isinstance(bucket, TokenBucket) or bucket.rate != rate:
                bucket = request.connection["read_bucket"] = TokenBucket(rate)
            buckets.append(bucket)
        instance = self.instance_networks.bucket(request.client_address[0], RECEIVE)
        if instance is not None:
            buckets.append(instance)
        return buckets

    def write_throttles(self, request: Request) -> list[TokenBucket]:
        """Token buckets an object write's body on this connection must pass through as it is received."""
        instance = self.instance_networks.bucket(request.client_address[0], SEND)
        return [instance] if instance is not None else []

    def serve(self, host: str, port: int, region: str | None = None) -> LocalOCIServer:
        """A listener for ``region`` (None: the home region) on ``host:port``."""
        return LocalOCIServer(self, host, port, region or self.home_region)
