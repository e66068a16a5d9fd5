"""OCI operations the import needs: volumes, worker instances, attachments, PARs, with waits.

Each call retries throttling (429) and transient server errors (5xx) with capped,
jittered exponential backoff, except "Out of host capacity.", which retrying in the
same place cannot fix: it raises :class:`OutOfCapacity` so the caller can move to
another availability domain.

Every create that OCI lets carry an ``opc-retry-token`` (volumes, instances,
attachments) carries one, so a retry after a reply that was lost (a 500 or a dropped
connection after the create took effect) returns the resource already made instead of
a second one. The SDK's CreatePreauthenticatedRequest and
CreateVolumeBackupPolicyAssignment take no token: a PAR is named for its import and a
lost one is found by name and deleted; an assignment is looked up before it is made.

The undos (:func:`terminate_worker`, :func:`discard_volume`, :func:`detach_volume`,
:func:`delete_par`) are the same functions whether a failed import unwinds, a crashed
run's hook cleans up or the sweeper removes what a dead run left; each treats "already
gone" as done.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import oci
import requests
from circuitbreaker import CircuitBreakerError

from . import contract
from .errors import ImageRejected, InvalidRequest, OutOfCapacity, ResourceFailed

log = logging.getLogger(__name__)
T = TypeVar("T")
models = oci.core.models

GB = 1024**3
MIN_VOLUME_GB, MAX_VOLUME_GB = contract.MIN_VOLUME_GB, contract.MAX_VOLUME_GB


def with_backoff(call: Callable[..., T], *args: Any, attempts: int = 8, base: float = 0.5, cap: float = 20.0,
                 **kwargs: Any) -> T:
    """Call an SDK method, retrying 429, 5xx and connection errors with full-jitter backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return call(*args, **kwargs)
        except oci.exceptions.ServiceError as exc:
            if exc.status == 500 and "out of host capacity" in (exc.message or "").lower():
                raise OutOfCapacity(exc.message) from exc
            if not (exc.status == 429 or exc.status >= 500) or attempt == attempts:
                raise
            reason = f"{exc.status} {exc.code}"
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                oci.exceptions.RequestException, oci.exceptions.ConnectTimeout) as exc:
            if attempt == attempts:
                raise
            reason = type(exc).__name__
        except CircuitBreakerError as exc:
            # the SDK's client stops calling after a run of failures (an undo after a fault, say):
            # wait until it lets calls through again rather than give up while it is open
            if attempt == attempts:
                raise
            delay = min(60.0, max(1.0, float(getattr(exc._circuit_breaker, "open_remaining", 30)) + 0.5))
            log.info("%s: the SDK's circuit breaker is open; retrying in %.1fs (attempt %d of %d)",
                     getattr(call, "__name__", "call"), delay, attempt, attempts)
            time.sleep(delay)
            continue
        delay = random.uniform(0, min(cap, base * 2 ** attempt))
        log.info("%s: %s; retrying in %.1fs (attempt %d of %d)", getattr(call, "__name__", "call"), reason,
                 delay, attempt, attempts)
        time.sleep(delay)
    raise AssertionError("unreachable")


def wait_for_state(get: Callable[[], Any], wanted: str | tuple[str, ...], what: str, timeout: float = 900.0,
                   poll: float = 0.5, failed: tuple[str, ...] = ()) -> Any:
    """Poll ``get()`` (returning an SDK model) until its ``lifecycle_state`` is ``wanted``."""
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    deadline = time.monotonic() + timeout
    interval = min(poll, 0.05)  # a quick first look (most transitions are quick), then backing off
    while True:
        resource = with_backoff(get)
        state = resource.lifecycle_state
        if state in wanted:
            return resource
        if state in failed:
            raise ResourceFailed(f"{what} is {state}, expected {'/'.join(wanted)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} still {state} after {timeout:.0f}s, expected {'/'.join(wanted)}")
        time.sleep(interval)
        interval = min(poll, interval * 1.5)


def volume_size_gb(virtual_size: int) -> int:
    """The volume size for an image: its virtual size rounded up to whole GB, at least 50 GB."""
    size = max(MIN_VOLUME_GB, -(-virtual_size // GB))
    if size > MAX_VOLUME_GB:
        raise ImageRejected("too-large", f"virtual size {virtual_size} bytes exceeds the largest block volume "
                            f"({MAX_VOLUME_GB} GB)")
    return size


@dataclass
class Clients:
    compute: oci.core.ComputeClient
    blockstorage: oci.core.BlockstorageClient
    network: oci.core.VirtualNetworkClient
    object_storage: oci.object_storage.ObjectStorageClient
    identity: oci.identity.IdentityClient


# -- volumes ---------------------------------------------------------------------

def create_volume(clients: Clients, compartment_id: str, availability_domain: str, size_gb: int, vpus_per_gb: int,
                  display_name: str, tags: dict[str, str], retry_token: str) -> Any:
    details = models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=availability_domain, size_in_gbs=size_gb,
        vpus_per_gb=vpus_per_gb, display_name=display_name, freeform_tags=tags)
    return with_backoff(clients.blockstorage.create_volume, details, opc_retry_token=retry_token).data


def create_volume_group(clients: Clients, compartment_id: str, availability_domain: str, display_name: str,
                        volume_ids: list[str], tags: dict[str, str], retry_token: str) -> Any:
    details = models.CreateVolumeGroupDetails(
        compartment_id=compartment_id, availability_domain=availability_domain, display_name=display_name,
        source_details=models.VolumeGroupSourceFromVolumesDetails(volume_ids=volume_ids), freeform_tags=tags)
    return with_backoff(clients.blockstorage.create_volume_group, details, opc_retry_token=retry_token).data


def update_volume_group(clients: Clients, group_id: str, volume_ids: list[str]) -> Any:
    """Make ``volume_ids`` the group's volumes (those left out leave it)."""
    return with_backoff(clients.blockstorage.update_volume_group, group_id,
                        models.UpdateVolumeGroupDetails(volume_ids=volume_ids)).data


def get_volume_group(clients: Clients, group_id: str) -> Any:
    return with_backoff(clients.blockstorage.get_volume_group, group_id).data


def wait_volume_group_available(clients: Clients, group_id: str, timeout: float = 900.0) -> Any:
    return _wait_available(clients.blockstorage.get_volume_group, group_id, "volume group", timeout)


def _wait_available(get: Callable[[str], Any], resource_id: str, what: str, timeout: float) -> Any:
    return wait_for_state(lambda: get(resource_id).data, "AVAILABLE", f"{what} {resource_id}", timeout,
                          failed=("FAULTY", "TERMINATING", "TERMINATED"))


def delete_volume_group(clients: Clients, group_id: str) -> None:
    """Delete a volume group (its volumes stay); one already gone counts as deleted."""
    delete_if_present(clients.blockstorage.delete_volume_group, group_id)


def delete_if_present(delete: Callable[[str], Any], resource_id: str) -> None:
    """Call ``delete``; a resource already gone (404, or 409 while terminating) counts as deleted."""
    try:
        with_backoff(delete, resource_id)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404 or (exc.status == 409 and "TERMINAT" in (exc.message or "")):
            return
        raise


def is_boot_volume(volume_id: str) -> bool:
    """Whether the OCID names a boot volume (the boot disk of a bootable machine import)."""
    return volume_id.startswith("ocid1.bootvolume.")


def clone_volume(clients: Clients, compartment_id: str, source_id: str, availability_domain: str,
                 display_name: str, tags: dict[str, str], retry_token: str) -> Any:
    """CreateVolume from another volume: a point-in-time clone (same availability domain)."""
    details = models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=availability_domain, display_name=display_name,
        freeform_tags=tags, source_details=models.VolumeSourceFromVolumeDetails(id=source_id))
    return with_backoff(clients.blockstorage.create_volume, details, opc_retry_token=retry_token).data


def get_volume(clients: Clients, volume_id: str) -> Any:
    get = clients.blockstorage.get_boot_volume if is_boot_volume(volume_id) else clients.blockstorage.get_volume
    return with_backoff(get, volume_id).data


def update_volume(clients: Clients, volume_id: str, **fields: Any) -> Any:
    """UpdateVolume, or UpdateBootVolume for a boot volume, with ``fields`` (snake_case)."""
    if is_boot_volume(volume_id):
        return with_backoff(clients.blockstorage.update_boot_volume, volume_id,
                            models.UpdateBootVolumeDetails(**fields)).data
    return with_backoff(clients.blockstorage.update_volume, volume_id, models.UpdateVolumeDetails(**fields)).data


def wait_volume_available(clients: Clients, volume_id: str, timeout: float = 900.0) -> Any:
    if is_boot_volume(volume_id):
        return _wait_available(clients.blockstorage.get_boot_volume, volume_id, "boot volume", timeout)
    return _wait_available(clients.blockstorage.get_volume, volume_id, "volume", timeout)


def delete_volume(clients: Clients, volume_id: str) -> None:
    """Delete a volume (or boot volume); one already gone counts as deleted."""
    delete_if_present(clients.blockstorage.delete_boot_volume if is_boot_volume(volume_id)
                      else clients.blockstorage.delete_volume, volume_id)


def discard_volume(clients: Clients, compartment_id: str, volume_id: str, keep: bool = False) -> str:
    """Undo of a volume's creation: detach it everywhere, then delete it, or keep it tagged failed.

    Returns ``"deleted"`` or ``"kept"``.
    """
    for attachment in live_attachments(clients, compartment_id, volume_id):
        detach_volume(clients, attachment.id)
    if keep:
        try:
            volume = get_volume(clients, volume_id)
        except oci.exceptions.ServiceError as exc:
            if exc.status == 404:
                return "deleted"
            raise
        update_volume(clients, volume_id, freeform_tags={**(volume.freeform_tags or {}),
                                                         contract.TAG_STATE: contract.STATE_FAILED})
        return "kept"
    delete_volume(clients, volume_id)
    return "deleted"


def tag_volume(clients: Clients, volume_id: str, tags: dict[str, str]) -> Any:
    """Add ``tags`` to a volume's freeform tags (keeping the others)."""
    volume = get_volume(clients, volume_id)
    return update_volume(clients, volume_id, freeform_tags={**(volume.freeform_tags or {}), **tags})


def set_volume_performance(clients: Clients, volume_id: str, vpus_per_gb: int) -> Any:
    update_volume(clients, volume_id, vpus_per_gb=vpus_per_gb)
    return wait_volume_available(clients, volume_id)


def assign_backup_policy(clients: Clients, volume_id: str, policy_id: str) -> Any:
    existing = with_backoff(clients.blockstorage.get_volume_backup_policy_asset_assignment, volume_id).data
    for assignment in existing:
        if assignment.policy_id == policy_id:
            return assignment
        with_backoff(clients.blockstorage.delete_volume_backup_policy_assignment, assignment.id)
    details = models.CreateVolumeBackupPolicyAssignmentDetails(asset_id=volume_id, policy_id=policy_id)
    return with_backoff(clients.blockstorage.create_volume_backup_policy_assignment, details).data


def backup_policy_id(clients: Clients, name_or_id: str) -> str:
    """Resolve an Oracle-defined policy name (gold, silver, bronze) or pass an OCID through."""
    if name_or_id.startswith("ocid1."):
        return name_or_id
    policies = oci.pagination.list_call_get_all_results(clients.blockstorage.list_volume_backup_policies).data
    for policy in policies:
        if policy.display_name.lower() == name_or_id.lower():
            return policy.id
    raise InvalidRequest("unknown-backup-policy", f"no backup policy named {name_or_id!r}; known: "
                         f"{', '.join(p.display_name for p in policies)}")


def find_volumes(clients: Clients, compartment_id: str, tags: dict[str, str]) -> list[Any]:
    """Live volumes and boot volumes in the compartment carrying every one of ``tags``."""
    volumes = oci.pagination.list_call_get_all_results(clients.blockstorage.list_volumes,
                                                       compartment_id=compartment_id).data
    volumes += oci.pagination.list_call_get_all_results(clients.blockstorage.list_boot_volumes,
                                                        compartment_id=compartment_id).data
    return [v for v in volumes if v.lifecycle_state not in ("TERMINATING", "TERMINATED")
            and all((v.freeform_tags or {}).get(k) == val for k, val in tags.items())]


# -- workers ---------------------------------------------------------------------

def launch_worker(clients: Clients, *, compartment_id: str, availability_domain: str, subnet_id: str, image_id: str,
                  shape: str, ocpus: float | None, memory_in_gbs: float | None, boot_volume_size_gb: int | None,
                  assign_public_ip: bool, display_name: str, ssh_public_key: str, user_data: str,
                  tags: dict[str, str], retry_token: str) -> Any:
    shape_config = (models.LaunchInstanceShapeConfigDetails(ocpus=ocpus, memory_in_gbs=memory_in_gbs)
                    if ocpus is not None else None)
    details = models.LaunchInstanceDetails(
        compartment_id=compartment_id, availability_domain=availability_domain, shape=shape,
        shape_config=shape_config, display_name=display_name,
        source_details=models.InstanceSourceViaImageDetails(image_id=image_id,
                                                            boot_volume_size_in_gbs=boot_volume_size_gb),
        create_vnic_details=models.CreateVnicDetails(subnet_id=subnet_id, assign_public_ip=assign_public_ip),
        metadata={"ssh_authorized_keys": ssh_public_key, "user_data": user_data},
        freeform_tags=tags,
    )
    return with_backoff(clients.compute.launch_instance, details, opc_retry_token=retry_token).data


def wait_instance_running(clients: Clients, instance_id: str, timeout: float = 900.0) -> Any:
    return wait_for_state(lambda: clients.compute.get_instance(instance_id).data, "RUNNING",
                          f"worker {instance_id}", timeout, failed=("TERMINATING", "TERMINATED"))


def worker_address(clients: Clients, compartment_id: str, instance_id: str, public: bool) -> str:
    attachments = with_backoff(clients.compute.list_vnic_attachments, compartment_id, instance_id=instance_id).data
    for attachment in attachments:
        if attachment.lifecycle_state == "ATTACHED":
            vnic = with_backoff(clients.network.get_vnic, attachment.vnic_id).data
            address = vnic.public_ip if public else vnic.private_ip
            if address:
                return address
    raise ResourceFailed(f"worker {instance_id} has no {'public' if public else 'private'} IP address")


def terminate_worker(clients: Clients, instance_id: str, wait: bool = True, timeout: float = 900.0,
                     preserve_boot_volume: bool = False) -> None:
    """Terminate a worker (and its boot volume, unless ``preserve_boot_volume``); an instance
    already gone counts as terminated."""
    try:
        with_backoff(clients.compute.terminate_instance, instance_id, preserve_boot_volume=preserve_boot_volume)
    except oci.exceptions.ServiceError as exc:
        if exc.status != 404:
            raise
        return
    if wait:
        wait_for_state(lambda: clients.compute.get_instance(instance_id).data, "TERMINATED",
                       f"worker {instance_id}", timeout)


# -- boot volumes and launched machines ------------------------------------------------

def launch_for_boot_volume(clients: Clients, *, compartment_id: str, availability_domain: str, subnet_id: str,
                           image_id: str, shape: str, ocpus: float | None, memory_in_gbs: float | None,
                           size_gb: int, display_name: str, tags: dict[str, str], retry_token: str) -> Any:
    """Launch an instance from a platform image only for the boot volume of ``size_gb`` it makes."""
    details = models.LaunchInstanceDetails(
        compartment_id=compartment_id, availability_domain=availability_domain, shape=shape,
        shape_config=_shape_config(ocpus, memory_in_gbs), display_name=display_name,
        source_details=models.InstanceSourceViaImageDetails(image_id=image_id, boot_volume_size_in_gbs=size_gb),
        create_vnic_details=models.CreateVnicDetails(subnet_id=subnet_id, assign_public_ip=False),
        freeform_tags=tags)
    return with_backoff(clients.compute.launch_instance, details, opc_retry_token=retry_token).data


def _shape_config(ocpus: float | None, memory_in_gbs: float | None) -> Any:
    return (models.LaunchInstanceShapeConfigDetails(ocpus=ocpus, memory_in_gbs=memory_in_gbs)
            if ocpus is not None else None)


def boot_volume_of(clients: Clients, instance: Any) -> str:
    attachments = with_backoff(clients.compute.list_boot_volume_attachments, instance.availability_domain,
                               instance.compartment_id, instance_id=instance.id).data
    if not attachments:
        raise ResourceFailed(f"instance {instance.id} has no boot volume attachment")
    return attachments[0].boot_volume_id


def terminate_keeping_boot_volume(clients: Clients, instance_id: str, timeout: float = 900.0) -> None:
    """Terminate an instance, its boot volume preserved; one already gone counts as terminated."""
    terminate_worker(clients, instance_id, timeout=timeout, preserve_boot_volume=True)


def launch_machine(clients: Clients, *, compartment_id: str, availability_domain: str, subnet_id: str,
                   boot_volume_id: str, shape: str, ocpus: float | None, memory_in_gbs: float | None,
                   firmware: str, boot_volume_type: str, network_type: str, display_name: str,
                   tags: dict[str, str], retry_token: str, ssh_authorized_keys: str | None = None) -> Any:
    """Launch the imported machine from its boot volume (with ``ssh_authorized_keys`` in its metadata)."""
    details = models.LaunchInstanceDetails(
        metadata={"ssh_authorized_keys": ssh_authorized_keys} if ssh_authorized_keys else None,
        compartment_id=compartment_id, availability_domain=availability_domain, shape=shape,
        shape_config=_shape_config(ocpus, memory_in_gbs), display_name=display_name,
        source_details=models.InstanceSourceViaBootVolumeDetails(boot_volume_id=boot_volume_id),
        launch_options=models.LaunchOptions(firmware=firmware, boot_volume_type=boot_volume_type,
                                            network_type=network_type, remote_data_volume_type="PARAVIRTUALIZED"),
        create_vnic_details=models.CreateVnicDetails(subnet_id=subnet_id, assign_public_ip=False),
        freeform_tags=tags)
    return with_backoff(clients.compute.launch_instance, details, opc_retry_token=retry_token).data


def stop_instance(clients: Clients, instance_id: str, timeout: float = 900.0) -> None:
    state = with_backoff(clients.compute.get_instance, instance_id).data.lifecycle_state
    if state == "RUNNING":
        with_backoff(clients.compute.instance_action, instance_id, "STOP")
    wait_for_state(lambda: clients.compute.get_instance(instance_id).data, ("STOPPED", "TERMINATED"),
                   f"instance {instance_id}", timeout)


def ssh_banner(address: str, port: int, timeout: float = 5.0) -> str | None:
    """The SSH identification line a server at ``address:port`` sends first, or None (no answer,
    or not SSH)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            line = conn.recv(255).split(b"\r\n")[0].split(b"\n")[0].decode("ascii", "replace")
    except OSError:
        return None
    return line if line.startswith("SSH-") else None


def console_text(clients: Clients, instance_id: str, timeout: float = 120.0) -> str:
    """The instance's serial console as OCI captured it just now (the capture is deleted after)."""
    history = with_backoff(clients.compute.capture_console_history,
                           models.CaptureConsoleHistoryDetails(instance_id=instance_id)).data
    try:
        wait_for_state(lambda: clients.compute.get_console_history(history.id).data, "SUCCEEDED",
                       f"console history {history.id}", timeout, failed=("FAILED",))
        data = with_backoff(clients.compute.get_console_history_content, history.id, offset=0,
                            length=1024 * 1024).data
        return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)
    finally:
        delete_if_present(clients.compute.delete_console_history, history.id)


def find_instances(clients: Clients, compartment_id: str, tags: dict[str, str]) -> list[Any]:
    instances = oci.pagination.list_call_get_all_results(clients.compute.list_instances,
                                                         compartment_id=compartment_id).data
    return [i for i in instances if i.lifecycle_state not in ("TERMINATING", "TERMINATED")
            and all((i.freeform_tags or {}).get(k) == val for k, val in tags.items())]


# -- attachments -------------------------------------------------------------------

def existing_attachment(clients: Clients, instance_id: str, volume_id: str) -> Any | None:
    """The live attachment of ``volume_id`` to ``instance_id``, if there is one."""
    existing = [a for a in with_backoff(clients.compute.list_volume_attachments,
                                        compartment_id=_compartment_of_instance(clients, instance_id),
                                        instance_id=instance_id, volume_id=volume_id).data
                if a.lifecycle_state in ("ATTACHING", "ATTACHED")]
    return existing[0] if existing else None


def attach_volume(clients: Clients, instance_id: str, volume_id: str, kind: str, retry_token: str,
                  read_only: bool = False) -> Any:
    """Attach a volume to a worker VM at a free consistent device path (no wait)."""
    free = with_backoff(clients.compute.list_instance_devices, instance_id, is_available=True).data
    device = free[0].name if free else None
    if kind == "iscsi":
        details = models.AttachIScsiVolumeDetails(instance_id=instance_id, volume_id=volume_id, device=device,
                                                  is_read_only=read_only)
    else:
        details = models.AttachParavirtualizedVolumeDetails(instance_id=instance_id, volume_id=volume_id,
                                                            device=device, is_read_only=read_only)
    return with_backoff(clients.compute.attach_volume, details, opc_retry_token=retry_token).data


def wait_attached(clients: Clients, attachment_id: str, timeout: float = 900.0) -> Any:
    return wait_for_state(lambda: clients.compute.get_volume_attachment(attachment_id).data, "ATTACHED",
                          f"attachment {attachment_id}", timeout, failed=("DETACHING", "DETACHED"))


def _compartment_of_instance(clients: Clients, instance_id: str) -> str:
    return with_backoff(clients.compute.get_instance, instance_id).data.compartment_id


def detach_volume(clients: Clients, attachment_id: str, timeout: float = 900.0) -> None:
    try:
        attachment = with_backoff(clients.compute.get_volume_attachment, attachment_id).data
        if attachment.lifecycle_state == "ATTACHED":
            with_backoff(clients.compute.detach_volume, attachment_id)
        elif attachment.lifecycle_state == "DETACHED":
            return
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            return
        raise
    wait_for_state(lambda: clients.compute.get_volume_attachment(attachment_id).data, "DETACHED",
                   f"attachment {attachment_id}", timeout)


def live_attachments(clients: Clients, compartment_id: str, volume_id: str,
                     availability_domain: str | None = None) -> list[Any]:
    """A volume's attachments that are not detached; a boot volume's boot attachment too (given its AD)."""
    attachments = with_backoff(clients.compute.list_volume_attachments, compartment_id=compartment_id,
                               volume_id=volume_id).data
    if is_boot_volume(volume_id) and availability_domain:
        attachments = attachments + with_backoff(clients.compute.list_boot_volume_attachments, availability_domain,
                                                  compartment_id, boot_volume_id=volume_id).data
    return [a for a in attachments if a.lifecycle_state in ("ATTACHING", "ATTACHED", "DETACHING")]


# -- object access -----------------------------------------------------------------

def read_only_par(clients: Clients, namespace: str, bucket: str, object_name: str, lifetime: dt.timedelta,
                  name: str) -> tuple[str, str]:
    """A read-only pre-authenticated request for one object: ``(par id, access URI)``."""
    return object_par(clients, namespace, bucket, object_name, lifetime, name, "ObjectRead")


def object_par(clients: Clients, namespace: str, bucket: str, object_name: str, lifetime: dt.timedelta,
               name: str, access_type: str) -> tuple[str, str]:
    """A pre-authenticated request for one object (``ObjectRead``, ``ObjectWrite``): ``(par id, access URI)``.

    The access URI is shown only in the create's reply, so a PAR whose reply was lost is of
    no use: every PAR of this ``name`` that exists when a create fails is deleted before
    the create is tried again.
    """
    details = oci.object_storage.models.CreatePreauthenticatedRequestDetails(
        name=name, object_name=object_name, access_type=access_type,
        time_expires=dt.datetime.now(dt.timezone.utc) + lifetime)

    def create() -> Any:
        try:
            # No SDK retry inside: each attempt is one create, so each lost one is cleaned up here.
            return clients.object_storage.create_preauthenticated_request(
                namespace, bucket, details, retry_strategy=oci.retry.NoneRetryStrategy()).data
        except Exception:
            for lost in pars_named(clients, namespace, bucket, object_name, name):
                delete_par(clients, namespace, bucket, lost.id)
            raise

    par = with_backoff(create)
    return par.id, par.access_uri


def head_object_or_none(clients: Clients, namespace: str, bucket: str, object_name: str) -> dict[str, str] | None:
    """An object's HEAD headers (lower-case names), or None when it does not exist."""
    try:
        reply = with_backoff(clients.object_storage.head_object, namespace, bucket, object_name)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            return None
        raise
    return {k.lower(): v for k, v in reply.headers.items()}


def abort_upload(clients: Clients, namespace: str, bucket: str, object_name: str, upload_id: str) -> None:
    """Abort a multipart upload (its parts go); one already gone counts as aborted."""
    try:
        with_backoff(clients.object_storage.abort_multipart_upload, namespace, bucket, object_name, upload_id)
    except oci.exceptions.ServiceError as exc:
        if exc.status != 404:
            raise


def pars_named(clients: Clients, namespace: str, bucket: str, object_name: str, name: str) -> list[Any]:
    return [p for p in pars_of(clients, namespace, bucket, object_name) if p.name == name]


def pars_of(clients: Clients, namespace: str, bucket: str, object_name: str) -> list[Any]:
    """The PARs of one object."""
    pars = oci.pagination.list_call_get_all_results(clients.object_storage.list_preauthenticated_requests,
                                                    namespace, bucket, object_name_prefix=object_name).data
    return [p for p in pars if p.object_name == object_name]


def delete_par(clients: Clients, namespace: str, bucket: str, par_id: str) -> None:
    try:
        with_backoff(clients.object_storage.delete_preauthenticated_request, namespace, bucket, par_id)
    except oci.exceptions.ServiceError as exc:
        if exc.status != 404:
            raise
