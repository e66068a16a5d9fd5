"""Boot volumes on the local OCI, through the real SDK: made by a launch from an image, kept
by a terminate that preserves them, attached elsewhere as a data volume, and launched from:
then the disk they hold boots under qemu and its serial console is the console history."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import oci
import pytest

from localoci.blockstorage.models import IMAGE_CONTENT
from tests import boot_disks
from tests.waiting import wait_for
from tests.workers import launch_details
from tests import waiting

models = oci.core.models

pytestmark = pytest.mark.skipif(bool(boot_disks.tools_missing()) or shutil.which("qemu-system-x86_64") is None,
                                reason=f"boot tools missing: {boot_disks.tools_missing()}")


def wait_state(client, getter, resource_id: str, state: str, seconds: float = 30):
    return waiting.wait_until(client, getter(resource_id), "lifecycle_state", state, max_wait_seconds=seconds,
                          max_interval_seconds=0.2).data


def console_until(compute, instance_id: str, text: str, seconds: float) -> str:
    """Capture the console history until it shows ``text``; that capture's content."""
    def capture() -> str:
        history = compute.capture_console_history(
            models.CaptureConsoleHistoryDetails(instance_id=instance_id)).data
        history = wait_state(compute, compute.get_console_history, history.id, "SUCCEEDED")
        content = compute.get_console_history_content(history.id, length=1024 * 1024).data.decode(errors="replace")
        compute.delete_console_history(history.id)
        return content if text in content else ""
    return wait_for(capture, seconds, f"{text!r} on the console", interval=1)


@pytest.fixture
def preserved_boot_volume(compute, blockstorage, compartment_id, availability_domains, subnet_id, client_key):
    """A boot volume of 50 GB left behind by a worker instance terminated with preserve_boot_volume."""
    details = launch_details(compartment_id, availability_domains[0], subnet_id, client_key)
    details.source_details.boot_volume_size_in_gbs = 50
    instance = compute.launch_instance(details).data
    wait_state(compute, compute.get_instance, instance.id, "RUNNING")
    [attachment] = compute.list_boot_volume_attachments(availability_domains[0], compartment_id,
                                                         instance_id=instance.id).data
    compute.terminate_instance(instance.id, preserve_boot_volume=True)
    wait_state(compute, compute.get_instance, instance.id, "TERMINATED")
    boot_volume = wait_state(blockstorage, blockstorage.get_boot_volume, attachment.boot_volume_id, "AVAILABLE")
    yield boot_volume
    if blockstorage.get_boot_volume(boot_volume.id).data.lifecycle_state == "AVAILABLE":
        blockstorage.delete_boot_volume(boot_volume.id)


def test_terminate_deletes_the_boot_volume_unless_asked_to_preserve_it(
        compute, blockstorage, compartment_id, availability_domains, subnet_id, client_key, preserved_boot_volume):
    assert preserved_boot_volume.size_in_gbs == 50
    instance = compute.launch_instance(launch_details(compartment_id, availability_domains[0], subnet_id, client_key)).data
    wait_state(compute, compute.get_instance, instance.id, "RUNNING")
    [attachment] = compute.list_boot_volume_attachments(availability_domains[0], compartment_id,
                                                         instance_id=instance.id).data
    assert attachment.lifecycle_state == "ATTACHED"
    compute.terminate_instance(instance.id)
    wait_state(blockstorage, blockstorage.get_boot_volume, attachment.boot_volume_id, "TERMINATED")
    assert compute.get_boot_volume_attachment(attachment.id).data.lifecycle_state == "DETACHED"


@pytest.mark.heavy
def test_a_boot_volume_written_elsewhere_boots_its_disk_and_shows_it_on_the_console(
        compute, blockstorage, compartment_id, availability_domains, subnet_id, client_key, tmp_path,
        preserved_boot_volume):
    ad = availability_domains[0]
    worker = compute.launch_instance(launch_details(compartment_id, ad, subnet_id, client_key)).data
    wait_state(compute, compute.get_instance, worker.id, "RUNNING")
    try:
        attachment = compute.attach_volume(models.AttachParavirtualizedVolumeDetails(
            instance_id=worker.id, volume_id=preserved_boot_volume.id,
            device="/dev/oracleoci/oraclevdb")).data
        attachment = wait_state(compute, compute.get_volume_attachment, attachment.id, "ATTACHED")
        device = Path(attachment.device)
        with open(device, "rb") as f:
            assert f.read(len(IMAGE_CONTENT)) == IMAGE_CONTENT  # the platform image is there, not zeros
        # Launching from it, or deleting it, while it is attached elsewhere is refused.
        with pytest.raises(oci.exceptions.ServiceError) as refused:
            blockstorage.delete_boot_volume(preserved_boot_volume.id)
        assert refused.value.status == 409
        disk = boot_disks.bios_disk(tmp_path / "bios.raw")
        with open(disk, "rb") as src, open(device, "r+b") as dst:
            shutil.copyfileobj(src, dst)
        compute.detach_volume(attachment.id)
        wait_state(compute, compute.get_volume_attachment, attachment.id, "DETACHED")
    finally:
        compute.terminate_instance(worker.id)

    launch = models.LaunchInstanceDetails(
        compartment_id=compartment_id, availability_domain=ad, shape="VM.Standard.E4.Flex",
        display_name="booted", source_details=models.InstanceSourceViaBootVolumeDetails(
            boot_volume_id=preserved_boot_volume.id),
        launch_options=models.LaunchOptions(firmware="BIOS", boot_volume_type="PARAVIRTUALIZED",
                                            network_type="PARAVIRTUALIZED"),
        create_vnic_details=models.CreateVnicDetails(subnet_id=subnet_id))
    machine = compute.launch_instance(launch).data
    try:
        machine = wait_state(compute, compute.get_instance, machine.id, "RUNNING")
        assert machine.launch_options.firmware == "BIOS"
        content = console_until(compute, machine.id, boot_disks.LOGIN_PROMPT, 90)
        assert boot_disks.ISSUE_LINE in content and content.rstrip().endswith(boot_disks.LOGIN_PROMPT.strip())

        # Stopped, its boot volume detaches; started again without one, it is refused.
        compute.instance_action(machine.id, "STOP")
        wait_state(compute, compute.get_instance, machine.id, "STOPPED")
        [boot] = compute.list_boot_volume_attachments(ad, compartment_id, instance_id=machine.id).data
        compute.detach_boot_volume(boot.id)
        wait_state(compute, compute.get_boot_volume_attachment, boot.id, "DETACHED")
        with pytest.raises(oci.exceptions.ServiceError) as refused:
            compute.instance_action(machine.id, "START")
        assert refused.value.status == 409
        again = compute.attach_boot_volume(models.AttachBootVolumeDetails(
            instance_id=machine.id, boot_volume_id=preserved_boot_volume.id)).data
        wait_state(compute, compute.get_boot_volume_attachment, again.id, "ATTACHED")
        compute.instance_action(machine.id, "START")
        wait_state(compute, compute.get_instance, machine.id, "RUNNING")
    finally:
        compute.terminate_instance(machine.id, preserve_boot_volume=True)
        wait_state(compute, compute.get_instance, machine.id, "TERMINATED")
    # Its qemu is gone with it.
    assert subprocess.run(["pgrep", "-f", "--", f"-name {machine.id.rsplit('.', 1)[-1]}"]).returncode == 1


def test_launch_options_are_checked(compute, compartment_id, availability_domains, subnet_id, preserved_boot_volume):
    launch = models.LaunchInstanceDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[0], shape="VM.Standard.E4.Flex",
        source_details=models.InstanceSourceViaBootVolumeDetails(boot_volume_id=preserved_boot_volume.id),
        launch_options=models.LaunchOptions(firmware="COREBOOT"),
        create_vnic_details=models.CreateVnicDetails(subnet_id=subnet_id))
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        compute.launch_instance(launch)
    assert refused.value.status == 400 and "firmware" in refused.value.message
