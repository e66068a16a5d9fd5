"""Compute on the local OCI: real sshd workers, devices and volume attachments, via the real SDK."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from pathlib import Path

import oci
import paramiko
import pytest

from diskimport.keys import SshKeyPair as KeyPair
from tests.waiting import wait_for
from tests.workers import connect, launch_details
from tests import waiting

models = oci.core.models


def wait_state(client, getter, resource_id: str, state: str):
    return waiting.wait_until(client, getter(resource_id), "lifecycle_state", state, max_wait_seconds=30, max_interval_seconds=0.2).data


@pytest.fixture
def host_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture
def running_instance(compute, compartment_id, availability_domains, subnet_id, client_key, host_key):
    details = launch_details(compartment_id, availability_domains[0], subnet_id, client_key, host_key,
                             freeform_tags={"purpose": "test"})
    instance = compute.launch_instance(details).data
    assert instance.lifecycle_state == "PROVISIONING"
    instance = wait_state(compute, compute.get_instance, instance.id, "RUNNING")
    yield instance
    if compute.get_instance(instance.id).data.lifecycle_state not in ("TERMINATING", "TERMINATED"):
        compute.terminate_instance(instance.id)
    wait_state(compute, compute.get_instance, instance.id, "TERMINATED")


def private_ip(compute, network, compartment_id: str, instance_id: str) -> str:
    attachments = compute.list_vnic_attachments(compartment_id, instance_id=instance_id).data
    assert len(attachments) == 1
    return network.get_vnic(attachments[0].vnic_id).data.private_ip


def refuses_tcp(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return False
    except OSError:
        return True


def test_launched_instance_is_reachable_with_injected_key_and_pinned_host_key(
    running_instance, compute, network, compartment_id, localoci, client_key, host_key
):
    address = private_ip(compute, network, compartment_id, running_instance.id)
    assert address.startswith("127.") and address != "127.0.0.1"
    with connect(address, localoci.ssh_port, getpass.getuser(), client_key, host_key) as conn:
        result = conn.run("echo $LOCALOCI_INSTANCE_ID", hide=True)
    assert result.stdout.strip() == running_instance.id


def test_unknown_host_key_is_rejected(running_instance, compute, network, compartment_id, localoci, client_key):
    address = private_ip(compute, network, compartment_id, running_instance.id)
    impostor = KeyPair.generate()
    with pytest.raises(paramiko.SSHException):
        with connect(address, localoci.ssh_port, getpass.getuser(), client_key, impostor) as conn:
            conn.run("true", hide=True)


def test_key_not_in_launch_metadata_is_refused(running_instance, compute, network, compartment_id, localoci, host_key):
    address = private_ip(compute, network, compartment_id, running_instance.id)
    with pytest.raises(paramiko.AuthenticationException):
        with connect(address, localoci.ssh_port, getpass.getuser(), KeyPair.generate(), host_key) as conn:
            conn.run("true", hide=True)


def test_instance_without_cloud_init_host_keys_still_serves_ssh(
    compute, compartment_id, availability_domains, subnet_id, client_key, localoci
):
    instance = compute.launch_instance(launch_details(compartment_id, availability_domains[1], subnet_id, client_key)).data
    try:
        wait_state(compute, compute.get_instance, instance.id, "RUNNING")
        entry = next(i for i in localoci.inventory()["instances"] if i["id"] == instance.id)
        assert not refuses_tcp(entry["sshAddress"], entry["sshPort"])
    finally:
        compute.terminate_instance(instance.id)
        wait_state(compute, compute.get_instance, instance.id, "TERMINATED")


@pytest.mark.heavy
def test_bytes_written_to_attached_device_over_ssh_land_in_the_backing_file(
    running_instance, compute, blockstorage, network, compartment_id, localoci, client_key, host_key
):
    volume = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=running_instance.availability_domain, size_in_gbs=50)).data
    wait_state(blockstorage, blockstorage.get_volume, volume.id, "AVAILABLE")
    free = compute.list_instance_devices(running_instance.id, is_available=True).data
    assert free[0].name == "/dev/oracleoci/oraclevdb"
    attachment = compute.attach_volume(models.AttachParavirtualizedVolumeDetails(
        instance_id=running_instance.id, volume_id=volume.id, device=free[0].name)).data
    assert attachment.lifecycle_state == "ATTACHING"
    attachment = wait_state(compute, compute.get_volume_attachment, attachment.id, "ATTACHED")
    assert attachment.attachment_type == "paravirtualized"
    taken = {d.name for d in compute.list_instance_devices(running_instance.id, is_available=False).data}
    assert taken == {"/dev/oracleoci/oraclevdb"}

    address = private_ip(compute, network, compartment_id, running_instance.id)
    payload = "written-over-ssh"
    with connect(address, localoci.ssh_port, getpass.getuser(), client_key, host_key) as conn:
        conn.run(f"printf {payload} | dd of={attachment.device} bs=1M seek=3 conv=notrunc status=none", hide=True)

    backing = next(v for v in localoci.inventory()["volumes"] if v["id"] == volume.id)["backingFile"]
    assert backing == attachment.device
    with open(backing, "rb") as f:
        f.seek(3 * 1024 * 1024)
        assert f.read(len(payload)) == payload.encode()
    assert Path(backing).stat().st_size == 50 * 1024**3

    with pytest.raises(oci.exceptions.ServiceError) as attached_delete:
        blockstorage.delete_volume(volume.id)
    assert attached_delete.value.status == 409

    compute.detach_volume(attachment.id)
    wait_state(compute, compute.get_volume_attachment, attachment.id, "DETACHED")
    blockstorage.delete_volume(volume.id)
    wait_state(blockstorage, blockstorage.get_volume, volume.id, "TERMINATED")
    assert not Path(backing).exists()


def test_iscsi_attachment_reports_iscsi_fields(running_instance, compute, blockstorage, compartment_id):
    volume = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=running_instance.availability_domain, size_in_gbs=50)).data
    wait_state(blockstorage, blockstorage.get_volume, volume.id, "AVAILABLE")
    attachment = compute.attach_volume(models.AttachIScsiVolumeDetails(instance_id=running_instance.id, volume_id=volume.id)).data
    attachment = wait_state(compute, compute.get_volume_attachment, attachment.id, "ATTACHED")
    assert isinstance(attachment, models.IScsiVolumeAttachment)
    assert attachment.iqn.startswith("iqn.") and attachment.port == 3260 and attachment.ipv4 == "127.0.0.1"
    compute.terminate_instance(running_instance.id)
    wait_state(compute, compute.get_volume_attachment, attachment.id, "DETACHED")
    blockstorage.delete_volume(volume.id)


def test_attaching_a_volume_from_another_availability_domain_is_refused(
    running_instance, compute, blockstorage, compartment_id, availability_domains
):
    volume = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[2], size_in_gbs=50)).data
    wait_state(blockstorage, blockstorage.get_volume, volume.id, "AVAILABLE")
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        compute.attach_volume(models.AttachParavirtualizedVolumeDetails(instance_id=running_instance.id, volume_id=volume.id))
    assert refused.value.status == 400 and "LOCAL-AD-3" in refused.value.message
    blockstorage.delete_volume(volume.id)


def test_terminated_instance_stops_its_sshd_and_is_listed_terminated(
    running_instance, compute, network, compartment_id, localoci
):
    address = private_ip(compute, network, compartment_id, running_instance.id)
    assert not refuses_tcp(address, localoci.ssh_port)
    compute.terminate_instance(running_instance.id)
    assert compute.get_instance(running_instance.id).data.lifecycle_state in ("TERMINATING", "TERMINATED")
    wait_state(compute, compute.get_instance, running_instance.id, "TERMINATED")
    assert refuses_tcp(address, localoci.ssh_port)
    listed = {i.id: i.lifecycle_state for i in compute.list_instances(compartment_id).data}
    assert listed[running_instance.id] == "TERMINATED"
    assert running_instance.id not in {i["id"] for i in localoci.inventory()["instances"]}


def test_a_boot_that_fails_once_the_instance_was_terminated_leaves_it_terminated(tmp_path, client_key, monkeypatch):
    """Booting and terminating run on threads of their own, so a worker's sshd may fail to start
    after the instance was terminated (stopping it is one way to make it fail). The instance then
    stays TERMINATED, not STOPPED for ever. In-process, so the test can order the two threads: the
    boot is held once it has begun until the termination has ended, then its sshd fails for real
    (a broken configuration)."""
    import threading

    from localoci.app import LocalOCI
    from localoci.compute.models import WORKER_IMAGE_ID
    from localoci.compute.sshd import SshdHost

    began, go_on = threading.Event(), threading.Event()
    real_start = SshdHost.start

    def start_once_terminated(self: SshdHost, timeout: float = 15.0) -> None:
        began.set()
        assert go_on.wait(30)
        self.config_path.write_text("NoSuchOption yes\n")
        real_start(self, timeout)

    monkeypatch.setattr(SshdHost, "start", start_once_terminated)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = LocalOCI(tmp_path, ssh_port=port)
    try:
        app.scheduler.latency["instance:RUNNING"] = 3600.0  # the boot below is the only one
        compartment = app.tenancy_id
        vcn = app.network.create_vcn({"compartmentId": compartment, "cidrBlock": "10.0.0.0/16"})
        subnet = app.network.create_subnet({"compartmentId": compartment, "vcnId": vcn["id"], "cidrBlock": "10.0.0.0/24"})
        instance = app.compute.launch({
            "compartmentId": compartment, "availabilityDomain": app.identity.availability_domains()[0]["name"],
            "shape": "VM.Standard.E4.Flex", "sourceDetails": {"sourceType": "image", "imageId": WORKER_IMAGE_ID},
            "createVnicDetails": {"subnetId": subnet["id"]},
            "metadata": {"ssh_authorized_keys": client_key.public_openssh}})
        boot = threading.Thread(target=app.compute._provision, args=(instance["id"],))
        boot.start()
        assert began.wait(30)
        app.compute.terminate(instance["id"])
        wait_for(lambda: app.compute.instance(instance["id"])["lifecycleState"] == "TERMINATED",
                 what="the instance TERMINATED")
        go_on.set()
        boot.join(30)
        assert not boot.is_alive()
        assert app.compute.instance(instance["id"])["lifecycleState"] == "TERMINATED"
        assert "NoSuchOption" in (app.data_dir / "instances" / instance["id"].rsplit(".", 1)[-1] / "sshd.log").read_text()
    finally:
        go_on.set()
        app.stop()


def test_crashed_instance_refuses_ssh(running_instance, compute, network, compartment_id, localoci, client_key, host_key):
    address = private_ip(compute, network, compartment_id, running_instance.id)
    with connect(address, localoci.ssh_port, getpass.getuser(), client_key, host_key) as conn:
        conn.run("true", hide=True)
    localoci.admin("POST", f"instances/{running_instance.id}/crash")
    assert refuses_tcp(address, localoci.ssh_port)
    entry = next(i for i in localoci.inventory()["instances"] if i["id"] == running_instance.id)
    assert entry["crashed"] is True


@pytest.mark.skipif(os.geteuid() != 0, reason="a worker gets memory of its own only where the local OCI runs as root")
def test_a_workers_memory_is_its_own_and_goes_when_it_crashes(
    running_instance, compute, network, compartment_id, localoci, client_key, host_key
):
    address = private_ip(compute, network, compartment_id, running_instance.id)
    name = f"kept-by-{running_instance.id.rsplit('.', 1)[-1]}"
    with connect(address, localoci.ssh_port, getpass.getuser(), client_key, host_key) as conn:
        conn.run(f"mkdir /dev/shm/{name} && echo secret > /dev/shm/{name}/file", hide=True)
        size = int(conn.run("df -P -B1 /dev/shm | awk 'NR==2 {print $2}'", hide=True).stdout)
        namespace = conn.run("readlink /proc/self/ns/mnt", hide=True).stdout.strip()
    assert size == 16 * 1024**3  # the shape's memory
    assert not Path(f"/dev/shm/{name}").exists()  # not on the host's /dev/shm
    localoci.admin("POST", f"instances/{running_instance.id}/crash")
    # No process is left in the worker's mount namespace: its tmpfs, and the file, are gone.
    left = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                left.append(entry)
        except OSError:
            continue
    assert left == []


def test_stop_and_start_actions_cycle_the_worker(running_instance, compute, network, compartment_id, localoci):
    address = private_ip(compute, network, compartment_id, running_instance.id)
    compute.instance_action(running_instance.id, "STOP")
    wait_state(compute, compute.get_instance, running_instance.id, "STOPPED")
    assert refuses_tcp(address, localoci.ssh_port)
    compute.instance_action(running_instance.id, "START")
    wait_state(compute, compute.get_instance, running_instance.id, "RUNNING")
    assert not refuses_tcp(address, localoci.ssh_port)


def test_launch_with_unknown_image_or_availability_domain_is_refused(
    compute, compartment_id, availability_domains, subnet_id, client_key
):
    details = launch_details(compartment_id, "local:NO-SUCH-AD", subnet_id, client_key)
    with pytest.raises(oci.exceptions.ServiceError) as bad_ad:
        compute.launch_instance(details)
    assert bad_ad.value.status == 400 and "availabilityDomain" in bad_ad.value.message
    details = launch_details(compartment_id, availability_domains[0], subnet_id, client_key)
    details.source_details.image_id = "ocid1.image.oc1..missing"
    with pytest.raises(oci.exceptions.ServiceError) as bad_image:
        compute.launch_instance(details)
    assert bad_image.value.status == 404 and bad_image.value.code == "NotAuthorizedOrNotFound"


def test_cloud_init_with_a_malformed_host_key_is_refused(compute, compartment_id, availability_domains, subnet_id, client_key):
    import base64

    details = launch_details(compartment_id, availability_domains[0], subnet_id, client_key)
    details.metadata["user_data"] = base64.b64encode(b"#cloud-config\nssh_keys:\n  ed25519_private: not-a-key\n").decode()
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        compute.launch_instance(details)
    assert refused.value.status == 400 and "ed25519_private" in refused.value.message


def _loops_over(path: str) -> list[str]:
    listed = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME", "--associated", path],
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


@pytest.mark.parametrize("ending", ["detach", "terminate"])
def test_a_loop_device_the_instance_left_on_its_volume_goes_with_the_attachment(
        ending, running_instance, compute, blockstorage, compartment_id):
    """A command killed between losetup and its detach leaves a loop device over the volume: on
    OCI it lives in the instance and goes with the attachment; here it would outlive it on the host
    (and keep a deleted volume's space)."""
    volume = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=running_instance.availability_domain, size_in_gbs=50)).data
    wait_state(blockstorage, blockstorage.get_volume, volume.id, "AVAILABLE")
    attachment = compute.attach_volume(models.AttachParavirtualizedVolumeDetails(
        instance_id=running_instance.id, volume_id=volume.id)).data
    attachment = wait_state(compute, compute.get_volume_attachment, attachment.id, "ATTACHED")
    loop = subprocess.run(["losetup", "--read-only", "--find", "--show", "--sizelimit", str(1024 * 1024),
                           attachment.device], capture_output=True, text=True, check=True).stdout.strip()
    try:
        assert _loops_over(attachment.device) == [loop]
        if ending == "detach":
            compute.detach_volume(attachment.id)
            wait_state(compute, compute.get_volume_attachment, attachment.id, "DETACHED")
        else:
            compute.terminate_instance(running_instance.id)
            wait_state(compute, compute.get_instance, running_instance.id, "TERMINATED")
        assert _loops_over(attachment.device) == []
    finally:
        subprocess.run(["losetup", "--detach", loop], capture_output=True)
    blockstorage.delete_volume(volume.id)
    wait_state(blockstorage, blockstorage.get_volume, volume.id, "TERMINATED")
