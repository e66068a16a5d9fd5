"""The reference pipeline, re-enacted on the local OCI for the benchmark.

The reference (an Airflow DAG) does everything in sequence on one worker: launch it, set
up its tools, download the whole image onto its disk in one stream, ask qemu-img for
the virtual size, only then create and attach the volume, ``qemu-img convert -O raw``
onto the device without skipping zeros, ``fsck -n``, detach, terminate. This module
does those steps, in that order, with the same SDK calls, worker shape and SSH access
as the importer, so the benchmark compares pipelines rather than implementations.

One difference favours the reference: on the local OCI a volume is a file, where
qemu-img writes a zero region by punching a hole instead of writing zeros.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from blocks import ImportSettings, OCICredentials, WorkerShape
from diskimport import cloud
from diskimport.guest import filesystems
from diskimport.keys import SshKeyPair, cloud_init_host_keys
from diskimport.worker_vm.qemu_img import QemuImg
from diskimport.worker_vm.session import WorkerSession

TAGS = {"managed-by": "oci-disk-import-benchmark", "pipeline": "reference"}


@dataclass
class StepTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - start, 3)


def run_reference(credentials: OCICredentials, shape: WorkerShape, settings: ImportSettings, namespace: str,
                  bucket: str, object_name: str, fmt: str) -> dict[str, Any]:
    """Import ``object_name`` the reference's way; return its total and per-step seconds."""
    clients = credentials.clients()
    ad = cloud.with_backoff(clients.identity.list_availability_domains, shape.compartment_id).data[0].name
    timer = StepTimer()
    client_key, host_key = SshKeyPair.generate(), SshKeyPair.generate()
    instance_id = volume_id = attachment_id = None
    start = time.monotonic()
    try:
        with timer.step("launch-worker"):
            instance = cloud.launch_worker(
                clients, compartment_id=shape.compartment_id, availability_domain=ad, subnet_id=shape.subnet_id,
                image_id=shape.image_id, shape=shape.shape, ocpus=shape.ocpus, memory_in_gbs=shape.memory_in_gbs,
                boot_volume_size_gb=shape.boot_volume_size_gb, assign_public_ip=shape.assign_public_ip,
                display_name="reference-worker", ssh_public_key=client_key.public_openssh,
                user_data=cloud_init_host_keys(host_key), tags=TAGS, retry_token=secrets.token_hex(16))
            instance_id = instance.id
            cloud.wait_instance_running(clients, instance_id)
            address = cloud.worker_address(clients, shape.compartment_id, instance_id, shape.assign_public_ip)
        with WorkerSession(address, shape.ssh_port, shape.ssh_user, client_key, host_key,
                           sudo=shape.use_sudo) as session:
            with timer.step("setup-tools"):
                session.connect(timeout=shape.boot_timeout_seconds)
                QemuImg(session).version()
            staging = session.run(["mktemp", "-d", "/var/tmp/reference-import.XXXXXX"]).stdout.strip()
            image = f"{staging}/image"
            try:
                with timer.step("download"):
                    _download(session, clients, namespace, bucket, object_name, staging, image, address)
                with timer.step("measure"):
                    info = QemuImg(session).info(image, fmt)
                with timer.step("create-volume"):
                    volume = cloud.create_volume(clients, settings.compartment_id, ad,
                                                 cloud.volume_size_gb(info.virtual_size),
                                                 settings.vpus_during_import, "reference-volume", TAGS,
                                                 secrets.token_hex(16))
                    volume_id = volume.id
                    cloud.wait_volume_available(clients, volume_id)
                with timer.step("attach"):
                    attachment = cloud.attach_volume(clients, instance_id, volume_id, "paravirtualized",
                                                     secrets.token_hex(16))
                    attachment_id = attachment.id
                    attachment = cloud.wait_attached(clients, attachment_id)
                with timer.step("convert"):
                    QemuImg(session).convert(image, fmt, attachment.device, target_is_zero=False,
                                             out_of_order=False, coroutines=8, target_cache=None)
                with timer.step("fsck"):
                    filesystems.check_device(session, attachment.device, info.virtual_size)
            finally:
                session.run(["rm", "-rf", "--one-file-system", staging])
        with timer.step("detach"):
            cloud.detach_volume(clients, attachment_id)
            attachment_id = None
        with timer.step("terminate-worker"):
            cloud.terminate_worker(clients, instance_id)
            instance_id = None
        total = time.monotonic() - start
    finally:
        if attachment_id:
            cloud.detach_volume(clients, attachment_id)
        if instance_id:
            cloud.terminate_worker(clients, instance_id)
        if volume_id:
            cloud.delete_volume(clients, volume_id)
    return {"seconds": round(total, 3), "steps": timer.seconds}


def _download(session: WorkerSession, clients: cloud.Clients, namespace: str, bucket: str, object_name: str,
              staging: str, image: str, address: str) -> None:
    """One stream, the whole object, onto the worker's disk (from the worker's own address)."""
    par_id, uri = cloud.read_only_par(clients, namespace, bucket, object_name, dt.timedelta(hours=2),
                                      "reference-download")
    try:
        url = clients.object_storage.base_client.endpoint.rstrip("/") + uri
        config = f"{staging}/curl.conf"
        session.put_private_file(f'url = "{url}"\n', config)
        result = session.run(["curl", "--fail", "--silent", "--show-error", "--interface", address,
                              "--config", config, "--output", image], timeout=24 * 3600)
        if result.returncode != 0:
            raise RuntimeError(f"reference download failed: {result.stderr.strip()}")
    finally:
        cloud.delete_par(clients, namespace, bucket, par_id)
