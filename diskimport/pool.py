"""Worker VMs launched ahead: a pool that lets an import start at once instead of after minutes
of launch and boot.

A pooled worker VM is launched from the worker shape like any worker, in the pool's
availability domain (the first one imports try), with SSH keys of its own: its client key and
the host key it is given are kept in a :class:`KeyStore` (Prefect secret blocks in the flows)
under the name in its ``import-pool-key`` tag, and nowhere else. It waits, tagged
``import-pool-state=idle``, until an import takes it:

- **take**: the import reads the VM and retags it as its own worker (the run's tags and
  ``import-pool-state=taken``) with the ETag it read (``if-match``), so of two imports that
  read the same VM only one gets it; the winner takes its keys out of the store (they are
  deleted there), and from then on the VM is that import's worker: terminated after it, swept
  with its run. No key of one pooled VM opens another, and no VM is used twice.
- **refill** (after each take, and by the scheduled sweep): launch VMs until the pool holds its
  target: ``pool_size``, zero outside ``pool_hours``, no more than ``pool_max_ocpu_hours``
  allows (an idle VM costs its OCPUs every hour), and never so many that idle pooled VMs and
  workers at work together pass ``worker_concurrency_limit`` plus the pool's size. Workers at
  work stay within the limit (an import takes a pooled VM only inside its import slot); the
  pool's VMs come on top of it. A VM still booting counts as idle and can be taken: the import
  waits for the rest of its boot. A pooled VM that died is not counted, so the next refill
  replaces it.
- **trim** (by the sweeper): terminate the idle VMs past their idle time (``import-pool-until``),
  those beyond the target, those of a shape or image the block no longer names, and drop keys
  whose VM is gone.

Without a pool (``pool_size`` 0, the default) nothing here runs and every import launches its own
worker, as it always has; an import that finds the pool empty does the same.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import time
import uuid
from typing import Any, Protocol

import oci

from . import cloud, contract
from .keys import SshKeyPair, cloud_init_host_keys

TAG_POOL = "import-pool"              # a pooled worker VM: its pool (the worker shape block's name)
TAG_POOL_SHAPE = "import-pool-shape"  # and what it was launched as (pool_id: shape, image, subnet, ...)
TAG_POOL_STATE = "import-pool-state"  # idle until an import takes it, then taken
TAG_POOL_KEY = "import-pool-key"      # where its SSH keys wait in the key store until it is taken
TAG_POOL_UNTIL = "import-pool-until"  # when it is terminated if nobody took it (epoch seconds)
TAG_POOL_TAKEN = "import-pool-taken"  # when an import took it (epoch seconds): its idle time ended
TAG_POOL_VOLUME = "import-pool-volume"  # its blank volume, made beside it for the import that takes it
BLANK_VOLUME_GB = 50  # OCI's smallest block volume: what most small and medium disks are imported onto
IDLE, TAKEN = "idle", "taken"
KEY_PREFIX = "import-pool-"
LIVE = ("PROVISIONING", "STARTING", "RUNNING")
ORPHAN_KEY_SECONDS = 600.0  # a key whose VM is not seen this long after it was stored is dropped
log = logging.getLogger(__name__)


class KeyStore(Protocol):
    """Where pooled VMs' SSH keys wait to be taken (secret, and named by the VM's tag)."""

    def put(self, name: str, value: str) -> None: ...

    def get(self, name: str) -> str | None:
        """The value stored under ``name``; None if there is none."""

    def names(self) -> list[str]: ...

    def delete(self, name: str) -> None:
        """Remove ``name`` (nothing if it is not there)."""


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """The pool's settings, from the worker shape (``WorkerShape`` block fields ``pool_*``)."""

    size: int = 0
    idle_minutes: float = 30.0
    hours: str = "00-24"
    max_ocpu_hours: float | None = None

    @classmethod
    def of(cls, shape: Any) -> "PoolSettings":
        return cls(int(getattr(shape, "pool_size", 0) or 0), float(getattr(shape, "pool_idle_minutes", 30.0)),
                   str(getattr(shape, "pool_hours", "00-24") or "00-24"), getattr(shape, "pool_max_ocpu_hours", None))


@dataclasses.dataclass(frozen=True)
class Taken:
    """A pooled VM an import took: the instance, the keys that reach it, and its blank volume
    (now the import's to use or delete), if it has one."""

    instance: Any
    client_key: SshKeyPair
    host_key: SshKeyPair
    volume_id: str | None = None


def parse_hours(hours: str) -> list[tuple[int, int]]:
    """``"07-19"`` or ``"00-06,18-24"``: the UTC hours the pool is kept, as [start, end) pairs."""
    spans = []
    for part in hours.replace(" ", "").split(","):
        try:
            start, end = (int(x) for x in part.split("-"))
        except ValueError:
            raise contract.InvalidRequest("invalid-setting", f"pool_hours {hours!r}: each span is HH-HH "
                                          "(UTC hours, e.g. 07-19), spans separated by commas") from None
        if not 0 <= start < end <= 24:
            raise contract.InvalidRequest("invalid-setting", f"pool_hours {hours!r}: {part} is not a span of "
                                          "hours from 00 to 24")
        spans.append((start, end))
    return spans


def in_hours(hours: str, now: dt.datetime) -> bool:
    hour = now.astimezone(dt.timezone.utc).hour
    return any(start <= hour < end for start, end in parse_hours(hours))


def pool_id(shape: Any) -> str:
    """What a pooled VM must match to be taken: compartment, subnet, image, shape and its size, SSH user."""
    fields = [shape.compartment_id, shape.subnet_id, shape.image_id, shape.shape, shape.ocpus, shape.memory_in_gbs,
              shape.boot_volume_size_gb, shape.assign_public_ip, shape.ssh_user, shape.ssh_port]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def pool_availability_domain(shape: Any, region_ads: list[str]) -> str:
    """The pool's availability domain: the first one an import tries."""
    preferred = [ad for ad in shape.availability_domains if ad in region_ads]
    return (preferred or region_ads)[0]


def target_size(settings: PoolSettings, ocpus: float | None, now: dt.datetime, busy_workers: int,
                worker_limit: int) -> int:
    """How many idle VMs the pool should hold now: its size, zero outside its hours, within its cost
    cap, and never so many that idle VMs and workers at work together pass the worker limit plus
    the pool's size (workers at work stay within the limit by the import slots; the pool's VMs
    come on top of it, so a burst of imports finds VMs booted or booting ahead)."""
    if settings.size <= 0 or not in_hours(settings.hours, now):
        return 0
    size = settings.size
    if settings.max_ocpu_hours is not None:
        size = min(size, math.floor(settings.max_ocpu_hours / (ocpus or 1.0) + 1e-9))
    return max(0, min(size, worker_limit + size - busy_workers))


def _tags(instance: Any) -> dict[str, str]:
    return dict(instance.freeform_tags or {})


def _is_pooled_idle(instance: Any) -> bool:
    return _tags(instance).get(TAG_POOL_STATE) == IDLE


def managed_instances(clients: cloud.Clients, compartment_id: str) -> list[Any]:
    return cloud.find_instances(clients, compartment_id, {contract.TAG_MANAGED_BY: contract.MANAGED_BY})


def idle_vms(instances: list[Any], pool: str, shape_id: str | None = None, availability_domain: str | None = None
             ) -> list[Any]:
    """The live idle VMs of ``pool`` (launched as ``shape_id``, in ``availability_domain``), oldest first."""
    found = [i for i in instances if _is_pooled_idle(i) and _tags(i).get(TAG_POOL) == pool
             and shape_id in (None, _tags(i).get(TAG_POOL_SHAPE))
             and i.lifecycle_state in LIVE and availability_domain in (None, i.availability_domain)]
    return sorted(found, key=lambda i: (i.lifecycle_state != "RUNNING", i.time_created))


def busy_workers(instances: list[Any]) -> int:
    """Worker VMs at work: live, managed, neither idle in a pool nor a machine an import launched."""
    return sum(1 for i in instances if i.lifecycle_state in LIVE and not _is_pooled_idle(i)
               and contract.TAG_MACHINE_OF not in _tags(i))


class Pool:
    """The pool of one worker shape block (``name``), in its compartment and availability domain."""

    def __init__(self, clients: cloud.Clients, shape: Any, keys: KeyStore, import_settings: Any,
                 logger: logging.Logger | logging.LoggerAdapter | None = None, name: str = "default") -> None:
        self.clients, self.shape, self.keys = clients, shape, keys
        self.settings = PoolSettings.of(shape)
        parse_hours(self.settings.hours)
        self.worker_limit = import_settings.worker_concurrency_limit
        self.extra_tags = dict(import_settings.extra_tags or {})
        # each pooled VM gets a blank volume beside it, in the volumes' compartment, at the import's VPUs
        self.volume_compartment, self.volume_vpus = import_settings.compartment_id, import_settings.vpus_during_import
        self.name, self.shape_id = name, pool_id(shape)
        self.log = logger or log

    @property
    def enabled(self) -> bool:
        return self.settings.size > 0

    def availability_domain(self) -> str:
        ads = [ad.name for ad in cloud.with_backoff(self.clients.identity.list_availability_domains,
                                                    self.shape.compartment_id).data]
        return pool_availability_domain(self.shape, ads)

    # -- take ----------------------------------------------------------------------------------------

    def take(self, availability_domain: str, tags: dict[str, str], display_name: str) -> Taken | None:
        """Make one idle VM of the pool in ``availability_domain`` this import's worker, or None."""
        if not self.enabled:
            return None
        for candidate in idle_vms(managed_instances(self.clients, self.shape.compartment_id), self.name,
                                  self.shape_id, availability_domain):
            taken = self._take_one(candidate.id, tags, display_name)
            if taken is not None:
                return taken
        return None

    def _take_one(self, instance_id: str, tags: dict[str, str], display_name: str) -> Taken | None:
        claimed = self._claim(instance_id, tags, display_name)
        if claimed is None:
            return None
        updated, old = claimed
        key_name = old.get(TAG_POOL_KEY, "")
        try:
            stored = self.keys.get(key_name) if key_name else None
            if key_name:
                self.keys.delete(key_name)  # from now on only this run holds them
            keys = json.loads(stored) if stored is not None else None
            taken = Taken(updated, SshKeyPair(**keys["client"]), SshKeyPair(**keys["host"])) if keys else None
        except Exception:
            cloud.terminate_worker(self.clients, instance_id, wait=False)  # it is ours, and nobody can reach it
            raise
        if taken is None:
            self.log.warning("pooled worker VM %s has no keys in the store; terminating it", instance_id)
            cloud.terminate_worker(self.clients, instance_id, wait=False)
            return None
        self.log.info("took pooled worker VM %s (%s)", instance_id, updated.lifecycle_state)
        return dataclasses.replace(taken, volume_id=old.get(TAG_POOL_VOLUME))

    def _claim(self, instance_id: str, tags: dict[str, str], display_name: str, attempts: int = 5
               ) -> tuple[Any, dict[str, str]] | None:
        """Retag an idle pooled VM as this import's worker with the ETag just read; (the updated
        instance, its tags before) or None when another import took it or it is going away. A 412
        says only that the VM changed since it was read (another take, or its own lifecycle): it
        is read again and, while still idle, claimed again."""
        for _ in range(attempts):
            try:
                response = cloud.with_backoff(self.clients.compute.get_instance, instance_id)
            except oci.exceptions.ServiceError as exc:
                if exc.status == 404:
                    return None
                raise
            instance, etag = response.data, response.headers.get("etag")
            old = _tags(instance)
            if old.get(TAG_POOL_STATE) != IDLE or instance.lifecycle_state not in LIVE or not etag:
                return None
            new = {**tags, TAG_POOL: self.name, TAG_POOL_STATE: TAKEN, TAG_POOL_KEY: old.get(TAG_POOL_KEY, ""),
                   TAG_POOL_TAKEN: str(int(time.time()))}
            details = oci.core.models.UpdateInstanceDetails(freeform_tags=new, display_name=display_name)
            try:
                return cloud.with_backoff(self.clients.compute.update_instance, instance_id, details,
                                          if_match=etag).data, old
            except oci.exceptions.ServiceError as exc:
                if exc.status in (404, 409):
                    return None
                if exc.status != 412:
                    raise
                ours = self._ours_after_all(instance_id, new)
                if ours is not None:
                    return ours, old
        return None

    def _ours_after_all(self, instance_id: str, tags: dict[str, str]) -> Any | None:
        """After a 412: the instance, if the update that changed its ETag was this one's own (a retry
        of a call whose reply was lost), else None."""
        try:
            instance = cloud.with_backoff(self.clients.compute.get_instance, instance_id).data
        except oci.exceptions.ServiceError:
            return None
        return instance if _tags(instance) == tags else None

    # -- refill --------------------------------------------------------------------------------------

    def refill(self, now: dt.datetime | None = None) -> list[str]:
        """Launch idle VMs until the pool holds its target; the new VMs' OCIDs."""
        if not self.enabled:
            return []
        now = now or dt.datetime.now(dt.timezone.utc)
        ad = self.availability_domain()
        instances = managed_instances(self.clients, self.shape.compartment_id)
        idle = idle_vms(instances, self.name, self.shape_id, ad)
        wanted = target_size(self.settings, self.shape.ocpus, now, busy_workers(instances), self.worker_limit)
        launched = [self._launch(ad, now) for _ in range(wanted - len(idle))]
        launched = self._keep_within_target(launched, ad, wanted)
        if launched:
            self.log.info("pool %s: launched %d worker VM(s) ahead (%d idle, target %d)", self.name, len(launched),
                          len(idle), wanted)
        return launched

    def _keep_within_target(self, launched: list[str], ad: str, wanted: int) -> list[str]:
        """Refills that ran at once may together have launched too many: every refill keeps the
        ``wanted`` oldest idle VMs and terminates those of its own beyond them (all refills agree on
        which those are); the VMs it launched and kept."""
        if not launched:
            return launched
        idle = sorted(idle_vms(managed_instances(self.clients, self.shape.compartment_id), self.name,
                               self.shape_id, ad), key=lambda i: (i.time_created, i.id))
        kept = {i.id for i in idle[:wanted]}
        for vm in [i for i in idle if i.id in launched and i.id not in kept]:
            self._remove(vm)
        return [vm for vm in launched if vm in kept or vm not in {i.id for i in idle}]

    def _remove(self, instance: Any) -> None:
        """Terminate an idle pooled VM, and delete its keys and its blank volume."""
        cloud.terminate_worker(self.clients, instance.id, wait=False)
        self.keys.delete(_tags(instance).get(TAG_POOL_KEY, ""))
        if _tags(instance).get(TAG_POOL_VOLUME):
            cloud.delete_if_present(self.clients.blockstorage.delete_volume, _tags(instance)[TAG_POOL_VOLUME])

    def _launch(self, ad: str, now: dt.datetime) -> str:
        """One pooled VM: its keys stored, its blank volume created, then the VM launched naming both."""
        token = uuid.uuid4().hex
        client, host = SshKeyPair.generate(), SshKeyPair.generate()
        name = KEY_PREFIX + token
        self.keys.put(name, json.dumps({"client": dataclasses.asdict(client), "host": dataclasses.asdict(host),
                                        "stored": time.time()}))
        until = now.timestamp() + self.settings.idle_minutes * 60
        tags = {**self.extra_tags, contract.TAG_MANAGED_BY: contract.MANAGED_BY, TAG_POOL: self.name,
                TAG_POOL_SHAPE: self.shape_id, TAG_POOL_STATE: IDLE, TAG_POOL_KEY: name, TAG_POOL_UNTIL: str(int(until))}
        volume_id = self._blank_volume(ad, token, tags)
        shape = self.shape
        try:
            instance = cloud.launch_worker(
                self.clients, compartment_id=shape.compartment_id, availability_domain=ad, subnet_id=shape.subnet_id,
                image_id=shape.image_id, shape=shape.shape, ocpus=shape.ocpus, memory_in_gbs=shape.memory_in_gbs,
                boot_volume_size_gb=shape.boot_volume_size_gb, assign_public_ip=shape.assign_public_ip,
                display_name=f"pooled-worker-{token[:12]}", ssh_public_key=client.public_openssh,
                user_data=cloud_init_host_keys(host), tags={**tags, **({TAG_POOL_VOLUME: volume_id} if volume_id else {})},
                retry_token=token)
        except BaseException:
            self.keys.delete(name)
            if volume_id:
                cloud.delete_volume(self.clients, volume_id)
            raise
        return instance.id

    def _blank_volume(self, ad: str, token: str, tags: dict[str, str]) -> str | None:
        """A blank volume for the VM about to be launched (not waited for); a VM without one is still
        a worker: its import creates its volume as without a pool."""
        try:
            return cloud.create_volume(self.clients, self.volume_compartment, ad, BLANK_VOLUME_GB, self.volume_vpus,
                                       f"pooled-volume-{token[:12]}", tags,
                                       hashlib.sha256(f"{token}/volume".encode()).hexdigest()).id
        except oci.exceptions.ServiceError as exc:
            self.log.warning("a pooled worker VM gets no blank volume: %s", exc.message)
            return None

    # -- trim ----------------------------------------------------------------------------------------

    def trim(self, now: dt.datetime | None = None) -> list[str]:
        """Terminate idle pooled VMs of the compartment past their idle time, and this pool's beyond
        its target or launched as a shape it no longer is; drop keys no VM will use. The VMs terminated."""
        now = now or dt.datetime.now(dt.timezone.utc)
        instances = managed_instances(self.clients, self.shape.compartment_id)
        idle = [i for i in instances if _is_pooled_idle(i)]
        expired = [i for i in idle if float(_tags(i).get(TAG_POOL_UNTIL) or 0) <= now.timestamp()]
        ours = [i for i in idle_vms(instances, self.name) if i not in expired]
        wanted = target_size(self.settings, self.shape.ocpus, now, busy_workers(instances), self.worker_limit)
        ad = self.availability_domain() if ours else None
        misplaced = [i for i in ours if i.availability_domain != ad or _tags(i).get(TAG_POOL_SHAPE) != self.shape_id]
        kept = [i for i in ours if i not in misplaced]
        surplus = kept[wanted:] if len(kept) > wanted else []  # the youngest go first
        removed = []
        for instance in [*expired, *misplaced, *surplus]:
            self._remove(instance)
            removed.append(instance.id)
        self._drop_orphan_keys({_tags(i).get(TAG_POOL_KEY) for i in instances if i.id not in removed}, now)
        self._drop_orphan_volumes({_tags(i).get(TAG_POOL_VOLUME) for i in instances if i.id not in removed}, now)
        if removed:
            self.log.info("pool %s: terminated %d idle worker VM(s) (%d past their idle time)", self.name, len(removed),
                          len(expired))
        return removed

    def _drop_orphan_volumes(self, in_use: set[str | None], now: dt.datetime) -> None:
        """Delete the idle blank volumes no live VM names (its VM is gone, or an import took the VM
        and did not use it). One a refill made for a VM it is launching right now may go too: that
        VM's import then creates its own volume, as without a pool. One still being created is
        deleted by a later trim."""
        idle = cloud.find_volumes(self.clients, self.volume_compartment,
                                  {contract.TAG_MANAGED_BY: contract.MANAGED_BY, TAG_POOL_STATE: IDLE})
        for volume in idle:
            if volume.id not in in_use and volume.lifecycle_state == "AVAILABLE":
                cloud.delete_volume(self.clients, volume.id)

    def _drop_orphan_keys(self, in_use: set[str | None], now: dt.datetime) -> None:
        for name in self.keys.names():
            if not name.startswith(KEY_PREFIX) or name in in_use:
                continue
            stored = self.keys.get(name)
            # a young key may be a refill's whose VM is being launched right now
            if stored is not None and now.timestamp() - float(json.loads(stored).get("stored", 0)) >= ORPHAN_KEY_SECONDS:
                self.keys.delete(name)
