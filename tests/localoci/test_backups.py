"""Block volume, boot volume and volume group backups on a two-region local OCI, via the real SDK
(and once the real CLI): backed up, copied to the other region, restored bit-exact, isolated by
region, failed by faults, deleted with their files, copied sparse, and resumed after a restart. Clones of
volumes and boot volumes: point-in-time, sparse, in their source's domain, launchable."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import oci
import pytest

from localoci import process
from localoci.blockstorage.models import GB, IMAGE_CONTENT, MiB
from tests.localoci.test_oci_cli import OCI_CLI
from tests import waiting
from tests.guest_disks import data_ranges
from tests.workers import launch_details

models = oci.core.models
NO_RETRY = oci.retry.NoneRetryStrategy()
HOME, OTHER = "local-1", "local-2"


def wait_for(get: Callable[..., Any], resource_id: str, state: str, seconds: float = 180) -> Any:
    """The resource once in ``state``, polled often (oci.wait_until waits a second at least).
    Within minutes: a terminating instance stops its VM's processes, which under the whole
    suite on two cores once took over 30 s."""
    return waiting.wait_for(lambda: (resource := get(resource_id).data).lifecycle_state == state and resource,
                            seconds, f"{resource_id} {state}")


def refusal(call: Callable[[], Any]) -> oci.exceptions.ServiceError:
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        call()
    return refused.value


class Region:
    """The real SDK's clients of one region of the local OCI, and that region's availability domains."""

    def __init__(self, server: process.RunningLocalOCI, config: dict[str, Any], name: str) -> None:
        endpoint = server.region_endpoints[name]
        self.name = name
        self.bs = oci.core.BlockstorageClient(config, service_endpoint=endpoint)
        self.identity = oci.identity.IdentityClient(config, service_endpoint=endpoint)
        self.ads = [ad.name for ad in self.identity.list_availability_domains(server.tenancy_id).data]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[process.RunningLocalOCI]:
    running = process.start(tmp_path_factory.mktemp("regions"), regions=[HOME, OTHER])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def config(server: process.RunningLocalOCI) -> dict[str, Any]:
    return oci.config.from_file(server.oci_config_file, server.oci_profile)


@pytest.fixture(scope="module")
def home(server, config) -> Region:
    return Region(server, config, HOME)


@pytest.fixture(scope="module")
def other(server, config) -> Region:
    return Region(server, config, OTHER)


@pytest.fixture
def clean(server: process.RunningLocalOCI) -> Iterator[None]:
    server.admin("DELETE", "faults")
    yield
    server.admin("DELETE", "faults")
    server.admin("DELETE", "latency")


def files(server: process.RunningLocalOCI) -> dict[str, dict[str, Any]]:
    """Every live volume, boot volume and backup of the server by id, with its backing file."""
    inventory = server.inventory()
    return {entry["id"]: entry for key in ("volumes", "bootVolumes", "volumeBackups", "bootVolumeBackups")
            for entry in inventory[key]}


def backing_file(server: process.RunningLocalOCI, resource_id: str) -> Path:
    return Path(files(server)[resource_id]["backingFile"])


def same_bytes(a: Path, b: Path, length: int | None = None) -> bool:
    """Whether the files hold the same bytes (the first ``length`` of each, if told): compared where either
    holds data; where both have holes both read zeros."""
    size_a, size_b = a.stat().st_size, b.stat().st_size
    if length is None and size_a != size_b or length is not None and length > min(size_a, size_b):
        return False
    length = size_a if length is None else length
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(set(data_ranges(a) + data_ranges(b))):
            for offset in range(start, min(end, length), 8 * MiB):
                n = min(8 * MiB, min(end, length) - offset)
                fa.seek(offset)
                fb.seek(offset)
                if fa.read(n) != fb.read(n):
                    return False
    return True


def write_at(path: Path, writes: dict[int, bytes]) -> None:
    with open(path, "r+b") as f:
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)


@pytest.fixture
def volume_with(server, home, clean) -> Callable[..., models.Volume]:
    """An AVAILABLE volume of a region holding ``writes`` (offset: bytes) in its backing file."""
    def make(writes: dict[int, bytes], region: Region | None = None, size_in_gbs: int = 50, **extra: Any) -> models.Volume:
        region = region or home
        volume = region.bs.create_volume(models.CreateVolumeDetails(
            compartment_id=server.tenancy_id, availability_domain=region.ads[0], size_in_gbs=size_in_gbs, **extra)).data
        volume = wait_for(region.bs.get_volume, volume.id, "AVAILABLE")
        write_at(backing_file(server, volume.id), writes)
        return volume
    return make


def known_bytes() -> dict[int, bytes]:
    return {0: os.urandom(MiB), 7 * GB + 12345: os.urandom(3 * 4096 + 17), 50 * GB - MiB: os.urandom(MiB)}


# -- regions ---------------------------------------------------------------------------


def test_every_region_has_its_endpoint_its_domains_and_only_its_own_volumes(server, home, other, volume_with):
    assert list(server.region_endpoints) == [HOME, OTHER] and server.home_region == HOME
    assert server.endpoint == server.region_endpoints[HOME] == server.endpoint_of(HOME)
    assert server.region_endpoints[OTHER] != server.endpoint
    assert home.ads == ["local:LOCAL-AD-1", "local:LOCAL-AD-2", "local:LOCAL-AD-3"]
    assert other.ads == ["local:LOCAL-2-AD-1", "local:LOCAL-2-AD-2", "local:LOCAL-2-AD-3"]
    faults = other.identity.list_fault_domains(server.tenancy_id, other.ads[0]).data
    assert len(faults) == 3 and faults[0].availability_domain == other.ads[0]

    # A volume needs an availability domain of its own region.
    wrong = refusal(lambda: other.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0], size_in_gbs=50)))
    assert (wrong.status, wrong.code) == (400, "InvalidParameter") and "LOCAL-2-AD-1" in wrong.message

    there = volume_with({}, other)
    assert there.availability_domain == other.ads[0] and ".local-2." in there.id
    for call in (lambda: home.bs.get_volume(there.id),
                 lambda: home.bs.update_volume(there.id, models.UpdateVolumeDetails(display_name="x")),
                 lambda: home.bs.delete_volume(there.id),
                 lambda: home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=there.id)),
                 lambda: home.bs.create_volume_group(models.CreateVolumeGroupDetails(
                     compartment_id=server.tenancy_id, availability_domain=home.ads[0],
                     source_details=models.VolumeGroupSourceFromVolumesDetails(volume_ids=[there.id])))):
        missing = refusal(call)
        assert (missing.status, missing.code) == (404, "NotAuthorizedOrNotFound")
    assert there.id not in {v.id for v in home.bs.list_volumes(compartment_id=server.tenancy_id).data}
    assert there.id in {v.id for v in other.bs.list_volumes(compartment_id=server.tenancy_id).data}
    here = volume_with({}, home)
    assert here.id not in {v.id for v in other.bs.list_volumes(compartment_id=server.tenancy_id).data}
    assert {v["id"]: v["region"] for v in server.inventory()["volumes"]}[there.id] == OTHER
    with pytest.raises(KeyError, match="local-3"):
        server.endpoint_of("local-3")


# -- volume backups -----------------------------------------------------------------------


def test_a_volume_backup_holds_the_volume_as_it_was_and_restores_bit_exact(server, home, volume_with):
    writes = known_bytes()
    volume = volume_with(writes, display_name="data")
    token = uuid.uuid4().hex
    details = models.CreateVolumeBackupDetails(volume_id=volume.id, display_name="before", type="FULL",
                                               freeform_tags={"test": "backups"}, defined_tags={"Ops": {"Cost": "1"}})
    created = home.bs.create_volume_backup(details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    assert isinstance(created, models.VolumeBackup) and created.id.startswith("ocid1.volumebackup.oc1.local-1.")
    assert created.lifecycle_state == "CREATING"
    assert home.bs.create_volume_backup(details, opc_retry_token=token, retry_strategy=NO_RETRY).data.id == created.id
    backup = wait_for(home.bs.get_volume_backup, created.id, "AVAILABLE")
    assert (backup.volume_id, backup.display_name, backup.type, backup.source_type) == (volume.id, "before", "FULL", "MANUAL")
    assert (backup.size_in_gbs, backup.size_in_mbs, backup.compartment_id) == (50, 50 * 1024, server.tenancy_id)
    assert backup.unique_size_in_gbs == 1 and backup.expiration_time is None and backup.source_volume_backup_id is None
    assert backup.freeform_tags == {"test": "backups"} and backup.defined_tags == {"Ops": {"Cost": "1"}}
    assert backup.time_created and backup.time_request_received and backup.system_tags == {}
    assert same_bytes(backing_file(server, volume.id), backing_file(server, backup.id))

    # Written afterwards, the volume changes and the backup does not.
    write_at(backing_file(server, volume.id), {0: b"changed"})
    assert not same_bytes(backing_file(server, volume.id), backing_file(server, backup.id))
    restored = home.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[1], size_in_gbs=60,
        source_details=models.VolumeSourceFromVolumeBackupDetails(id=backup.id))).data
    assert restored.lifecycle_state == "PROVISIONING"
    restored = wait_for(home.bs.get_volume, restored.id, "AVAILABLE")
    assert restored.size_in_gbs == 60 and restored.availability_domain == home.ads[1]
    assert restored.source_details.type == "volumeBackup" and restored.source_details.id == backup.id
    path = backing_file(server, restored.id)
    assert path.stat().st_size == 60 * GB
    assert same_bytes(backing_file(server, backup.id), path, 50 * GB)
    with open(path, "rb") as f:
        assert f.read(MiB) == writes[0]

    # Without a size it is the backup's; smaller is refused.
    same = home.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0],
        source_details=models.VolumeSourceFromVolumeBackupDetails(id=backup.id))).data
    assert same.size_in_gbs == 50
    bigger = volume_with({}, size_in_gbs=80)
    big_backup = home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=bigger.id)).data
    assert big_backup.type == "INCREMENTAL"
    wait_for(home.bs.get_volume_backup, big_backup.id, "AVAILABLE")
    small = refusal(lambda: home.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0], size_in_gbs=50,
        source_details=models.VolumeSourceFromVolumeBackupDetails(id=big_backup.id))))
    assert (small.status, small.code) == (400, "InvalidParameter") and "80" in small.message

    # Listed by volume and state, paged; renamed and retagged.
    listed = home.bs.list_volume_backups(server.tenancy_id, volume_id=volume.id, lifecycle_state="AVAILABLE").data
    assert [b.id for b in listed] == [backup.id]
    first = home.bs.list_volume_backups(server.tenancy_id, limit=1)
    assert len(first.data) == 1 and first.next_page
    every = oci.pagination.list_call_get_all_results(home.bs.list_volume_backups, server.tenancy_id, limit=1).data
    assert {backup.id, big_backup.id} <= {b.id for b in every}
    renamed = home.bs.update_volume_backup(backup.id, models.UpdateVolumeBackupDetails(
        display_name="renamed", freeform_tags={"k": "v"})).data
    assert (renamed.display_name, renamed.freeform_tags, renamed.lifecycle_state) == ("renamed", {"k": "v"}, "AVAILABLE")
    unknown = refusal(lambda: home.bs.get_volume_backup("ocid1.volumebackup.oc1..none"))
    assert (unknown.status, unknown.code) == (404, "NotAuthorizedOrNotFound")


def test_a_backup_copied_to_the_other_region_lives_there_only_and_restores_bit_exact(server, home, other, volume_with):
    volume = volume_with(known_bytes())
    backup = home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=volume.id, type="FULL")).data
    backup = wait_for(home.bs.get_volume_backup, backup.id, "AVAILABLE")

    copy = home.bs.copy_volume_backup(backup.id, models.CopyVolumeBackupDetails(
        destination_region=OTHER, display_name="copied", kms_key_id="ocid1.key.oc1..k")).data
    assert copy.lifecycle_state == "CREATING" and copy.id.startswith("ocid1.volumebackup.oc1.local-2.")
    assert (copy.source_volume_backup_id, copy.source_type, copy.display_name) == (backup.id, "MANUAL", "copied")
    assert (copy.volume_id, copy.type, copy.size_in_gbs, copy.kms_key_id) == (volume.id, "FULL", 50, "ocid1.key.oc1..k")
    missing = refusal(lambda: home.bs.get_volume_backup(copy.id))
    assert (missing.status, missing.code) == (404, "NotAuthorizedOrNotFound")
    copy = wait_for(other.bs.get_volume_backup, copy.id, "AVAILABLE")
    assert [b.id for b in other.bs.list_volume_backups(server.tenancy_id, source_volume_backup_id=backup.id).data] == [copy.id]
    assert copy.id not in {b.id for b in home.bs.list_volume_backups(server.tenancy_id).data}
    assert backup.id not in {b.id for b in other.bs.list_volume_backups(server.tenancy_id).data}
    assert same_bytes(backing_file(server, backup.id), backing_file(server, copy.id))

    # Restored in its region, in that region's availability domain.
    elsewhere = refusal(lambda: home.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0],
        source_details=models.VolumeSourceFromVolumeBackupDetails(id=copy.id))))
    assert (elsewhere.status, elsewhere.code) == (404, "NotAuthorizedOrNotFound")
    restored = other.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=other.ads[2],
        source_details=models.VolumeSourceFromVolumeBackupDetails(id=copy.id))).data
    restored = wait_for(other.bs.get_volume, restored.id, "AVAILABLE")
    assert same_bytes(backing_file(server, volume.id), backing_file(server, restored.id))

    # Copies go to another region that exists.
    for region, word in ((HOME, "own region"), ("local-9", "Invalid destinationRegion")):
        refused = refusal(lambda: home.bs.copy_volume_backup(backup.id, models.CopyVolumeBackupDetails(
            destination_region=region)))
        assert (refused.status, refused.code) == (400, "InvalidParameter") and word in refused.message
    # A copy can be copied back.
    back = other.bs.copy_volume_backup(copy.id, models.CopyVolumeBackupDetails(destination_region=HOME)).data
    assert wait_for(home.bs.get_volume_backup, back.id, "AVAILABLE").source_volume_backup_id == copy.id


def test_the_oci_cli_copies_a_backup_to_the_other_region(server, home, other, volume_with):
    import json
    import subprocess

    volume = volume_with({4096: b"cli"})
    backup = home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=volume.id)).data
    wait_for(home.bs.get_volume_backup, backup.id, "AVAILABLE")
    result = subprocess.run(
        [str(OCI_CLI), "bv", "backup", "copy", "--volume-backup-id", backup.id, "--destination-region", OTHER,
         "--endpoint", server.endpoint, "--config-file", server.oci_config_file, "--profile", server.oci_profile],
        env={**os.environ, "OCI_CLI_SUPPRESS_FILE_PERMISSIONS_WARNING": "True"}, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    copied = json.loads(result.stdout)["data"]
    assert copied["source-volume-backup-id"] == backup.id and copied["lifecycle-state"] == "CREATING"
    wait_for(other.bs.get_volume_backup, copied["id"], "AVAILABLE")


# -- volume groups and boot volumes ---------------------------------------------------------


def test_a_volume_group_backup_is_copied_and_restored_as_a_group_in_the_other_region(server, home, other, volume_with):
    volumes = [volume_with(known_bytes()), volume_with({5 * GB: b"second"}, size_in_gbs=60)]
    group = home.bs.create_volume_group(models.CreateVolumeGroupDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0], display_name="machine",
        source_details=models.VolumeGroupSourceFromVolumesDetails(volume_ids=[v.id for v in volumes]))).data
    wait_for(home.bs.get_volume_group, group.id, "AVAILABLE")

    created = home.bs.create_volume_group_backup(models.CreateVolumeGroupBackupDetails(
        volume_group_id=group.id, display_name="machine backup", type="FULL")).data
    assert created.lifecycle_state == "CREATING" and created.id.startswith("ocid1.volumegroupbackup.")
    group_backup = wait_for(home.bs.get_volume_group_backup, created.id, "AVAILABLE")
    assert (group_backup.volume_group_id, group_backup.size_in_gbs, group_backup.type) == (group.id, 110, "FULL")
    members = [home.bs.get_volume_backup(b).data for b in group_backup.volume_backup_ids]
    assert [m.volume_id for m in members] == [v.id for v in volumes]
    assert all(m.lifecycle_state == "AVAILABLE" and m.volume_group_backup_id == group_backup.id for m in members)
    assert [g.id for g in home.bs.list_volume_group_backups(server.tenancy_id, volume_group_id=group.id).data] == \
           [group_backup.id]
    # A member goes with its group backup, not alone.
    alone = refusal(lambda: home.bs.delete_volume_backup(members[0].id))
    assert (alone.status, alone.code) == (409, "Conflict")

    copy = home.bs.copy_volume_group_backup(group_backup.id, models.CopyVolumeGroupBackupDetails(
        destination_region=OTHER, display_name="over there")).data
    assert copy.source_volume_group_backup_id == group_backup.id and copy.display_name == "over there"
    copy = wait_for(other.bs.get_volume_group_backup, copy.id, "AVAILABLE")
    assert home.bs.list_volume_group_backups(server.tenancy_id, display_name="over there").data == []
    copied = [other.bs.get_volume_backup(b).data for b in copy.volume_backup_ids]
    assert [c.source_volume_backup_id for c in copied] == [m.id for m in members]

    restored = other.bs.create_volume_group(models.CreateVolumeGroupDetails(
        compartment_id=server.tenancy_id, availability_domain=other.ads[0], display_name="restored",
        source_details=models.VolumeGroupSourceFromVolumeGroupBackupDetails(volume_group_backup_id=copy.id))).data
    assert isinstance(restored.source_details, models.VolumeGroupSourceFromVolumeGroupBackupDetails)
    assert restored.source_details.volume_group_backup_id == copy.id and len(restored.volume_ids) == 2
    restored = wait_for(other.bs.get_volume_group, restored.id, "AVAILABLE")
    for original, volume_id in zip(volumes, restored.volume_ids):
        volume = other.bs.get_volume(volume_id).data
        assert (volume.lifecycle_state, volume.volume_group_id, volume.size_in_gbs) == \
               ("AVAILABLE", restored.id, original.size_in_gbs)
        assert same_bytes(backing_file(server, original.id), backing_file(server, volume_id))


@pytest.fixture(scope="module")
def boot_volume(server, config, home) -> Iterator[models.BootVolume]:
    """The boot volume of a worker instance launched in the home region (terminated, the volume kept)."""
    from diskimport.keys import SshKeyPair

    compute = oci.core.ComputeClient(config, service_endpoint=server.endpoint)
    network = oci.core.VirtualNetworkClient(config, service_endpoint=server.endpoint)
    vcn = network.create_vcn(models.CreateVcnDetails(compartment_id=server.tenancy_id, cidr_block="10.0.0.0/16")).data
    subnet = network.create_subnet(models.CreateSubnetDetails(
        compartment_id=server.tenancy_id, vcn_id=vcn.id, cidr_block="10.0.0.0/24")).data
    instance = compute.launch_instance(launch_details(server.tenancy_id, home.ads[0], subnet.id,
                                                      SshKeyPair.generate())).data
    [attachment] = compute.list_boot_volume_attachments(home.ads[0], server.tenancy_id, instance_id=instance.id).data
    boot = wait_for(home.bs.get_boot_volume, attachment.boot_volume_id, "AVAILABLE")
    compute.terminate_instance(instance.id, preserve_boot_volume=True)
    wait_for(compute.get_instance, instance.id, "TERMINATED")
    yield boot, compute, subnet.id


def test_a_boot_volume_backup_is_copied_and_restored_in_both_regions_and_launches(server, home, other, boot_volume,
                                                                                 clean):
    boot, compute, subnet_id = boot_volume
    created = home.bs.create_boot_volume_backup(models.CreateBootVolumeBackupDetails(
        boot_volume_id=boot.id, display_name="boot backup", type="FULL")).data
    assert created.id.startswith("ocid1.bootvolumebackup.") and created.lifecycle_state == "CREATING"
    backup = wait_for(home.bs.get_boot_volume_backup, created.id, "AVAILABLE")
    assert (backup.boot_volume_id, backup.image_id, backup.size_in_gbs) == (boot.id, boot.image_id, boot.size_in_gbs)
    assert [b.id for b in home.bs.list_boot_volume_backups(server.tenancy_id, boot_volume_id=boot.id).data] == [backup.id]

    copy = home.bs.copy_boot_volume_backup(backup.id, models.CopyBootVolumeBackupDetails(destination_region=OTHER)).data
    assert copy.source_boot_volume_backup_id == backup.id
    copy = wait_for(other.bs.get_boot_volume_backup, copy.id, "AVAILABLE")
    assert same_bytes(backing_file(server, boot.id), backing_file(server, copy.id))

    restored = {}
    for region, backup_id in ((home, backup.id), (other, copy.id)):
        made = region.bs.create_boot_volume(models.CreateBootVolumeDetails(
            compartment_id=server.tenancy_id, availability_domain=region.ads[0], display_name="restored",
            source_details=models.BootVolumeSourceFromBootVolumeBackupDetails(id=backup_id))).data
        assert made.lifecycle_state == "PROVISIONING" and made.source_details.id == backup_id
        made = wait_for(region.bs.get_boot_volume, made.id, "AVAILABLE")
        assert (made.image_id, made.size_in_gbs, made.display_name) == (boot.image_id, boot.size_in_gbs, "restored")
        path = backing_file(server, made.id)
        assert same_bytes(backing_file(server, boot.id), path)
        with open(path, "rb") as f:
            assert f.read(len(IMAGE_CONTENT)) == IMAGE_CONTENT
        restored[region.name] = made
    assert restored[OTHER].id not in {b.id for b in home.bs.list_boot_volumes(
        availability_domain=other.ads[0], compartment_id=server.tenancy_id).data}

    # The restored boot volume boots a worker, as any other.
    launches(server, compute, home.ads[0], subnet_id, restored[HOME].id)


def launches(server: process.RunningLocalOCI, compute: oci.core.ComputeClient, ad: str, subnet_id: str,
             boot_volume_id: str) -> None:
    """An instance launched from the boot volume comes to RUNNING (and is terminated)."""
    launch = models.LaunchInstanceDetails(
        compartment_id=server.tenancy_id, availability_domain=ad, shape="VM.Standard.E4.Flex",
        source_details=models.InstanceSourceViaBootVolumeDetails(boot_volume_id=boot_volume_id),
        create_vnic_details=models.CreateVnicDetails(subnet_id=subnet_id))
    instance = compute.launch_instance(launch).data
    try:
        wait_for(compute.get_instance, instance.id, "RUNNING")
    finally:
        compute.terminate_instance(instance.id)
    wait_for(compute.get_instance, instance.id, "TERMINATED")


# -- clones ----------------------------------------------------------------------------------


def test_a_volume_clone_holds_its_source_as_it_was_when_asked_for(server, home, other, volume_with):
    writes = known_bytes()
    source = volume_with(writes, display_name="source", freeform_tags={"role": "source"})
    token = uuid.uuid4().hex
    details = models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0], size_in_gbs=60, display_name="clone",
        freeform_tags={"role": "clone"}, source_details=models.VolumeSourceFromVolumeDetails(id=source.id))
    made = home.bs.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    # Written after the clone was asked for, the source changes and the clone does not.
    write_at(backing_file(server, source.id), {0: b"after the clone"})
    assert made.lifecycle_state == "PROVISIONING" and made.id != source.id
    assert home.bs.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY).data.id == made.id
    clone = wait_for(home.bs.get_volume, made.id, "AVAILABLE")
    assert (clone.size_in_gbs, clone.availability_domain, clone.display_name) == (60, home.ads[0], "clone")
    assert clone.source_details.type == "volume" and clone.source_details.id == source.id
    assert clone.freeform_tags == {"role": "clone"}
    path = backing_file(server, clone.id)
    assert path.stat().st_size == 60 * GB
    with open(path, "rb") as f:
        for offset, data in writes.items():
            f.seek(offset)
            assert f.read(len(data)) == data, offset
    # copied sparse: its data is where the source's was, the rest holes
    assert sum(end - start for start, end in data_ranges(path)) <= 4 * MiB
    assert home.bs.get_volume(source.id).data.lifecycle_state == "AVAILABLE"

    # Without a size it is the source's; smaller, elsewhere, unknown or not AVAILABLE is refused, as OCI does.
    same = home.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0],
        source_details=models.VolumeSourceFromVolumeDetails(id=clone.id))).data
    assert same.size_in_gbs == 60
    refused = {}
    for name, ad, size, source_id, region in (
            ("smaller", home.ads[0], 50, clone.id, home), ("other domain", home.ads[1], None, source.id, home),
            ("unknown", home.ads[0], None, "ocid1.volume.oc1.local-1.none", home),
            ("other region", other.ads[0], None, source.id, other)):
        refused[name] = refusal(lambda: region.bs.create_volume(models.CreateVolumeDetails(
            compartment_id=server.tenancy_id, availability_domain=ad, size_in_gbs=size,
            source_details=models.VolumeSourceFromVolumeDetails(id=source_id)), retry_strategy=NO_RETRY))
    assert (refused["smaller"].status, refused["smaller"].code) == (400, "InvalidParameter")
    assert "60" in refused["smaller"].message and clone.id in refused["smaller"].message
    assert refused["other domain"].code == "InvalidParameter" and home.ads[0] in refused["other domain"].message
    assert (refused["unknown"].status, refused["other region"].status) == (404, 404)
    home.bs.delete_volume(same.id)
    wait_for(home.bs.get_volume, same.id, "TERMINATED")
    ended = refusal(lambda: home.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0],
        source_details=models.VolumeSourceFromVolumeDetails(id=same.id)), retry_strategy=NO_RETRY))
    assert (ended.status, ended.code) == (409, "IncorrectState") and "TERMINATED" in ended.message

    # An injected failResource leaves the clone FAULTY, and it cannot be cloned in turn.
    server.admin("POST", "faults", {"operation": "CreateVolume", "failResource": True})
    faulty = home.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0],
        source_details=models.VolumeSourceFromVolumeDetails(id=source.id))).data
    wait_for(home.bs.get_volume, faulty.id, "FAULTY")


def test_a_boot_volume_clone_launches_as_its_source_does(server, home, boot_volume, clean):
    boot, compute, subnet_id = boot_volume
    made = home.bs.create_boot_volume(models.CreateBootVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=boot.availability_domain, display_name="cloned boot",
        source_details=models.BootVolumeSourceFromBootVolumeDetails(id=boot.id))).data
    assert made.lifecycle_state == "PROVISIONING" and made.source_details.type == "bootVolume"
    clone = wait_for(home.bs.get_boot_volume, made.id, "AVAILABLE")
    assert (clone.image_id, clone.size_in_gbs, clone.display_name) == (boot.image_id, boot.size_in_gbs, "cloned boot")
    assert clone.source_details.id == boot.id
    assert same_bytes(backing_file(server, boot.id), backing_file(server, clone.id))
    elsewhere = refusal(lambda: home.bs.create_boot_volume(models.CreateBootVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=next(ad for ad in home.ads if ad != boot.availability_domain),
        source_details=models.BootVolumeSourceFromBootVolumeDetails(id=boot.id)), retry_strategy=NO_RETRY))
    assert (elsewhere.status, elsewhere.code) == (400, "InvalidParameter")
    launches(server, compute, clone.availability_domain, subnet_id, clone.id)


# -- faults, deletion, sparseness ----------------------------------------------------------


def test_a_copy_that_fails_after_taking_effect_is_one_copy_on_retry_and_failed_resources_are_faulty(
        server, home, other, volume_with):
    volume = volume_with({0: b"x" * 4096})
    server.admin("POST", "faults", {"operation": "CreateVolumeBackup", "status": 503, "code": "ServiceUnavailable"})
    before = refusal(lambda: home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=volume.id),
                                                          retry_strategy=NO_RETRY))
    assert before.status == 503 and home.bs.list_volume_backups(server.tenancy_id, volume_id=volume.id).data == []
    backup = home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=volume.id)).data
    wait_for(home.bs.get_volume_backup, backup.id, "AVAILABLE")

    server.admin("POST", "faults", {"operation": "CopyVolumeBackup", "phase": "after", "status": 500,
                                    "code": "InternalError", "match": {"volumeBackupId": backup.id}})
    details, token = models.CopyVolumeBackupDetails(destination_region=OTHER), uuid.uuid4().hex
    lost = refusal(lambda: home.bs.copy_volume_backup(backup.id, details, opc_retry_token=token, retry_strategy=NO_RETRY))
    assert (lost.status, lost.code) == (500, "InternalError")
    [made] = other.bs.list_volume_backups(server.tenancy_id, source_volume_backup_id=backup.id).data
    again = home.bs.copy_volume_backup(backup.id, details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    assert again.id == made.id
    assert len(other.bs.list_volume_backups(server.tenancy_id, source_volume_backup_id=backup.id).data) == 1
    wait_for(other.bs.get_volume_backup, made.id, "AVAILABLE")

    # failResource: the backup, or the copy, ends FAULTY instead of AVAILABLE; neither can be restored.
    server.admin("POST", "faults", {"operation": "CreateVolumeBackup", "failResource": True})
    faulty = home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=volume.id)).data
    wait_for(home.bs.get_volume_backup, faulty.id, "FAULTY")
    server.admin("POST", "faults", {"operation": "CopyVolumeBackup", "failResource": True})
    faulty_copy = home.bs.copy_volume_backup(backup.id, details).data
    wait_for(other.bs.get_volume_backup, faulty_copy.id, "FAULTY")
    for region, backup_id in ((home, faulty.id), (other, faulty_copy.id)):
        refused = refusal(lambda: region.bs.create_volume(models.CreateVolumeDetails(
            compartment_id=server.tenancy_id, availability_domain=region.ads[0],
            source_details=models.VolumeSourceFromVolumeBackupDetails(id=backup_id))))
        assert (refused.status, refused.code) == (409, "IncorrectState") and "FAULTY" in refused.message
        region.bs.delete_volume_backup(backup_id)
        wait_for(region.bs.get_volume_backup, backup_id, "TERMINATED")
    not_copyable = refusal(lambda: home.bs.copy_volume_backup(faulty.id, details))
    assert (not_copyable.status, not_copyable.code) == (409, "IncorrectState")


def test_deleting_backups_removes_their_files(server, home, other, volume_with):
    volume = volume_with({MiB: b"gone"})
    backup = home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=volume.id)).data
    wait_for(home.bs.get_volume_backup, backup.id, "AVAILABLE")
    copy = home.bs.copy_volume_backup(backup.id, models.CopyVolumeBackupDetails(destination_region=OTHER)).data
    wait_for(other.bs.get_volume_backup, copy.id, "AVAILABLE")
    group = home.bs.create_volume_group(models.CreateVolumeGroupDetails(
        compartment_id=server.tenancy_id, availability_domain=home.ads[0],
        source_details=models.VolumeGroupSourceFromVolumesDetails(volume_ids=[volume.id]))).data
    wait_for(home.bs.get_volume_group, group.id, "AVAILABLE")
    group_backup = home.bs.create_volume_group_backup(models.CreateVolumeGroupBackupDetails(volume_group_id=group.id)).data
    group_backup = wait_for(home.bs.get_volume_group_backup, group_backup.id, "AVAILABLE")
    paths = [backing_file(server, b) for b in (backup.id, copy.id, *group_backup.volume_backup_ids)]
    assert all(p.exists() for p in paths)

    home.bs.delete_volume_backup(backup.id)
    other.bs.delete_volume_backup(copy.id)
    home.bs.delete_volume_group_backup(group_backup.id)
    wait_for(home.bs.get_volume_backup, backup.id, "TERMINATED")
    wait_for(other.bs.get_volume_backup, copy.id, "TERMINATED")
    wait_for(home.bs.get_volume_group_backup, group_backup.id, "TERMINATED")
    assert home.bs.get_volume_backup(group_backup.volume_backup_ids[0]).data.lifecycle_state == "TERMINATED"
    assert not any(p.exists() for p in paths)
    twice = refusal(lambda: home.bs.delete_volume_backup(backup.id))
    assert (twice.status, twice.code) == (409, "IncorrectState")


def test_a_64_gib_volume_with_a_mib_written_is_backed_up_copied_and_restored_in_about_a_mib(
        server, home, other, volume_with):
    volume = volume_with({32 * GB: os.urandom(MiB)}, size_in_gbs=64)
    backup = home.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=volume.id)).data
    backup = wait_for(home.bs.get_volume_backup, backup.id, "AVAILABLE")
    copy = home.bs.copy_volume_backup(backup.id, models.CopyVolumeBackupDetails(destination_region=OTHER)).data
    wait_for(other.bs.get_volume_backup, copy.id, "AVAILABLE")
    restored = other.bs.create_volume(models.CreateVolumeDetails(
        compartment_id=server.tenancy_id, availability_domain=other.ads[0],
        source_details=models.VolumeSourceFromVolumeBackupDetails(id=copy.id))).data
    wait_for(other.bs.get_volume, restored.id, "AVAILABLE")
    every = files(server)
    for resource_id in (backup.id, copy.id, restored.id):
        assert Path(every[resource_id]["backingFile"]).stat().st_size == 64 * GB
        assert every[resource_id]["allocatedBytes"] <= 4 * MiB, every[resource_id]
    assert backup.unique_size_in_gbs == 1 and backup.size_in_gbs == 64
    assert same_bytes(backing_file(server, volume.id), backing_file(server, restored.id))


# -- a restart -----------------------------------------------------------------------------


def test_a_restart_serves_the_same_regions_and_finishes_a_copy_left_half_done(tmp_path):
    first = process.start(tmp_path / "data", regions=[HOME, OTHER])
    try:
        config = oci.config.from_file(first.oci_config_file, first.oci_profile)
        home, other = Region(first, config, HOME), Region(first, config, OTHER)
        volume = other.bs.create_volume(models.CreateVolumeDetails(
            compartment_id=first.tenancy_id, availability_domain=other.ads[0], size_in_gbs=50)).data
        wait_for(other.bs.get_volume, volume.id, "AVAILABLE")
        write_at(backing_file(first, volume.id), {GB: b"kept across a restart"})
        first.admin("POST", "latency", {"transition": "volumebackupcopy:AVAILABLE", "seconds": 600})
        backup = other.bs.create_volume_backup(models.CreateVolumeBackupDetails(volume_id=volume.id)).data
        wait_for(other.bs.get_volume_backup, backup.id, "AVAILABLE")
        copy = other.bs.copy_volume_backup(backup.id, models.CopyVolumeBackupDetails(destination_region=HOME)).data
    finally:
        first.stop()

    second = process.start(tmp_path / "data")  # no regions named: those of the last run
    try:
        assert list(second.region_endpoints) == [HOME, OTHER]
        home, other = Region(second, config, HOME), Region(second, config, OTHER)
        copy = wait_for(home.bs.get_volume_backup, copy.id, "AVAILABLE")
        assert other.bs.get_volume_backup(backup.id).data.lifecycle_state == "AVAILABLE"
        missing = refusal(lambda: home.bs.get_volume(volume.id))
        assert missing.status == 404
        assert same_bytes(backing_file(second, volume.id), backing_file(second, copy.id))
    finally:
        second.stop()
