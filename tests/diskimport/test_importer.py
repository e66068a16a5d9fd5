"""The import core's decisions, against the local OCI with the real SDK and sshd worker VMs,
without Prefect: idempotent creates, the ledger of undos, resume, force, competing runs,
options, block validation and refusal codes.

``import_object`` runs the importer's steps in the order the ``import-virtual-disk`` flow
calls them (the flow adds retries, the worker slot and the UI around them).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import oci
import pydantic
import pytest

from blocks import ImportSettings, OCICredentials, TargetMachine, WorkerShape
from diskimport import cloud, contract
from diskimport.contract import ImportOptions, InvalidRequest
from diskimport.errors import ImageRejected, ResourceFailed, is_deterministic
from diskimport.importer import CompetingImport, Importer, PreviousImports
from diskimport.images.machine import Machine
from diskimport.machine_import import MachineImport, MachinePlan
from diskimport.records import InspectedImage, ObjectVersion
from diskimport.run import Run
from tests.diskimport.conftest import import_object, live, version_of, volume_holds
from tests.waiting import wait_for
from tests import waiting

GiB = 1024**3
pytestmark = pytest.mark.usefixtures("no_faults")


# -- fixtures ------------------------------------------------------------------------------

def tagged_volume(blockstorage: Any, compartment_id: str, ad: str, version: ObjectVersion, state: str,
                  flow_run: str) -> Any:
    tags = {contract.TAG_MANAGED_BY: contract.MANAGED_BY, contract.TAG_IMPORT_ID: version.import_id,
            contract.TAG_FLOW_RUN: flow_run, contract.TAG_STATE: state}
    volume = blockstorage.create_volume(oci.core.models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=ad, size_in_gbs=50, freeform_tags=tags)).data
    return waiting.wait_until(blockstorage, blockstorage.get_volume(volume.id), "lifecycle_state", "AVAILABLE",
                          max_wait_seconds=30, max_interval_seconds=0.1).data


# -- idempotent creates: a reply lost after the create took effect ----------------------------------

def test_lost_reply_on_create_volume_gives_exactly_one_volume(localoci, make_importer, bucket, web01,
                                                                availability_domains):
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "phase": "after", "status": 500,
                                      "code": "InternalError", "message": "reply lost"})
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "phase": "after", "drop": True})
    volume = importer.create_volume(version, availability_domains[0], 50, "lost-reply")
    assert localoci.admin("GET", "faults") == []  # both lost replies happened
    assert [v["id"] for v in live(localoci, "volumes", version)] == [volume.id]
    importer.run.ledger.unwind()
    assert live(localoci, "volumes", version) == []


def test_lost_reply_on_launch_instance_gives_exactly_one_worker_vm(localoci, make_importer, bucket, web01,
                                                                    availability_domains):
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    localoci.admin("POST", "faults", {"operation": "LaunchInstance", "phase": "after", "drop": True})
    worker = importer.run.launch_worker(version.subject, availability_domains[0])
    assert localoci.admin("GET", "faults") == []
    assert [i["id"] for i in live(localoci, "instances", version)] == [worker.id]
    importer.run.terminate_worker(worker)
    assert live(localoci, "instances", version) == []
    assert importer.run.ledger.pending() == []


def test_lost_reply_on_attach_volume_gives_exactly_one_attachment(localoci, make_importer, bucket, web01,
                                                                   availability_domains, compute):
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    with importer.run:
        volume = importer.create_volume(version, availability_domains[0], 50, "attach-once")
        worker = importer.run.launch_worker(version.subject, availability_domains[0])
        localoci.admin("POST", "faults", {"operation": "AttachVolume", "phase": "after", "status": 500,
                                          "code": "InternalError", "message": "reply lost"})
        with importer.run.session(worker) as session:
            write = importer.volume_write(session, worker, volume, version, InspectedImage("raw", 50 * GiB, "raw"))
            device = write.attach()
            assert localoci.admin("GET", "faults") == []
            attachments = [a for a in localoci.inventory()["attachments"] if a["volumeId"] == volume.id]
            assert [a["id"] for a in attachments] == [write.attachment.id]
            assert device == attachments[0]["device"]
            write.detach()
        assert [a for a in localoci.inventory()["attachments"] if a["volumeId"] == volume.id] == []
        importer.run.terminate_worker(worker)
    importer.run.ledger.unwind()
    assert live(localoci, "volumes", version) == []


def test_a_create_volume_whose_wait_fails_leaves_no_volume_at_once(localoci, make_importer, bucket, web01,
                                                                    availability_domains):
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "failResource": True})
    with pytest.raises(ResourceFailed, match="FAULTY"):
        importer.create_volume(version, availability_domains[0], 50, "faulty")
    assert live(localoci, "volumes", version) == []  # not left for the sweeper
    assert importer.run.ledger.pending() == []
    # The next try is a new create (a new retry token), not the faulty volume again.
    volume = importer.create_volume(version, availability_domains[0], 50, "second")
    assert [v["id"] for v in live(localoci, "volumes", version)] == [volume.id]
    importer.run.ledger.unwind()
    assert live(localoci, "volumes", version) == []


# -- the whole import, and the options that change it ------------------------------------------

def test_import_writes_the_disk_and_leaves_only_the_volume(localoci, make_importer, bucket, web01):
    importer = make_importer(backup_policy="silver")
    version = version_of(importer, localoci, bucket)
    summary = import_object(importer, version, ImportOptions(ad_number=2, vpus=20))
    assert summary["availability_domain"].endswith("AD-2")
    assert summary["vpus_per_gb"] == 20 and summary["backup_policy_id"].endswith("silver")
    assert {c["status"] for c in summary["filesystems"]} == {"clean"}
    assert volume_holds(localoci, summary["volume_id"], web01[1])
    volumes = live(localoci, "volumes", version)
    assert [(v["id"], v["freeformTags"][contract.TAG_STATE]) for v in volumes] == [
        (summary["volume_id"], contract.STATE_IMPORTED)]
    assert live(localoci, "instances", version) == [] and importer.run.ledger.pending() == []
    assert not [p for p in localoci.inventory()["pars"] if p["objectName"] == version.name]

    again = make_importer()
    assert import_object(again, version)["reused"] is True
    forced = make_importer()
    redone = import_object(forced, version, force=True)
    assert redone["reused"] is False and redone["volume_id"] != summary["volume_id"]
    assert len(live(localoci, "volumes", version)) == 2


def test_a_failed_import_deletes_its_volume_or_keeps_it_tagged_failed(localoci, make_importer, bucket, web01,
                                                                       availability_domains):
    for keep in (False, True):
        importer = make_importer(keep_failed_volume=keep)
        version = version_of(importer, localoci, bucket)
        options = importer.options(version, ImportOptions())
        image = importer.inspect(version, options)
        with pytest.raises(RuntimeError, match="injected"):
            with importer.run:
                worker, volume = importer.provision(version, image, options, PreviousImports(None, ()))
                raise RuntimeError("injected failure after provisioning")
        assert live(localoci, "instances", version) == []
        left = live(localoci, "volumes", version)
        if keep:
            assert [(v["id"], v["freeformTags"][contract.TAG_STATE]) for v in left] == [
                (volume.id, contract.STATE_FAILED)]
            localoci_delete_volume(importer, volume.id)
        else:
            assert left == []


def localoci_delete_volume(importer: Importer, volume_id: str) -> None:
    cloud.delete_volume(importer.clients, volume_id)


def test_a_half_written_volume_of_a_dead_run_is_resumed(localoci, make_importer, bucket, web01, blockstorage,
                                                         compartment_id, availability_domains):
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    dead_run = str(uuid.uuid4())
    half = tagged_volume(blockstorage, compartment_id, availability_domains[2], version, contract.STATE_WRITING,
                         dead_run)
    backing = next(v["backingFile"] for v in localoci.inventory()["volumes"] if v["id"] == half.id)
    with open(backing, "r+b") as f:  # what the dead run wrote, and garbage where zeros belong
        f.seek(0)
        f.write(web01[1].read_bytes()[:1024 * 1024])
        f.seek(40 * 1024 * 1024)
        f.write(os.urandom(1024 * 1024))
    summary = import_object(importer, version)
    assert summary["volume_id"] == half.id and summary["resumed"] is True
    assert summary["availability_domain"] == availability_domains[2]
    assert volume_holds(localoci, half.id, web01[1])
    [volume] = live(localoci, "volumes", version)
    assert volume["freeformTags"][contract.TAG_FLOW_RUN] == importer.run.run_id


# -- competing runs ----------------------------------------------------------------------------

def test_a_run_meeting_a_live_run_of_the_same_version_waits_and_returns_its_volume(
        localoci, make_importer, bucket, web01, blockstorage, compartment_id, availability_domains, active_runs,
        caplog):
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    other = str(uuid.uuid4())
    active_runs.add(other)
    theirs = tagged_volume(blockstorage, compartment_id, availability_domains[0], version, contract.STATE_WRITING,
                           other)
    result: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: result.update(summary=import_object(importer, version)))
    caplog.set_level(logging.INFO, logger="diskimport.run")
    waiting.start()
    # Barrier: the run has looked twice and decided twice to wait (it logs each decision).
    wait_for(lambda: sum("waiting for it" in r.getMessage() for r in caplog.records) >= 2,
             what="the run waiting for the other one")
    assert waiting.is_alive(), "the run did not wait for the other one"
    assert live(localoci, "instances", version) == []  # it created nothing meanwhile
    cloud.tag_volume(importer.clients, theirs.id, {contract.TAG_STATE: contract.STATE_IMPORTED})
    waiting.join(30)
    assert result["summary"]["reused"] is True and result["summary"]["volume_id"] == theirs.id
    assert [v["id"] for v in live(localoci, "volumes", version)] == [theirs.id]
    blockstorage.delete_volume(theirs.id)


def test_a_run_waits_for_another_run_only_so_long(localoci, make_importer, bucket, web01, blockstorage,
                                                   compartment_id, availability_domains, active_runs):
    importer = make_importer()
    importer.competing_wait_seconds = 0.3
    version = version_of(importer, localoci, bucket)
    other = str(uuid.uuid4())
    active_runs.add(other)
    theirs = tagged_volume(blockstorage, compartment_id, availability_domains[0], version, contract.STATE_WRITING,
                           other)
    with pytest.raises(TimeoutError, match=f"flow run {other} has been importing"):
        importer.previous_imports(version)
    assert not is_deterministic(TimeoutError())  # a retry of the run may find the other one done
    blockstorage.delete_volume(theirs.id)


def test_of_two_runs_that_created_volumes_at_once_the_later_yields(localoci, make_importer, bucket, web01,
                                                                    blockstorage, compartment_id,
                                                                    availability_domains, active_runs):
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    rival_run = "00000000-0000-0000-0000-000000000000"  # sorts before any uuid4 the importer has
    active_runs.add(rival_run)
    theirs = tagged_volume(blockstorage, compartment_id, availability_domains[0], version, contract.STATE_WRITING,
                           rival_run)
    options = importer.options(version, ImportOptions())
    image = importer.inspect(version, options)
    with pytest.raises(CompetingImport) as yielded:
        with importer.run:
            importer.provision(version, image, options, PreviousImports(None, ()))
    assert yielded.value.flow_run == rival_run
    assert [v["id"] for v in live(localoci, "volumes", version)] == [theirs.id]
    assert live(localoci, "instances", version) == []
    blockstorage.delete_volume(theirs.id)


@pytest.mark.parametrize("force", [False, True])
def test_a_run_whose_import_another_run_finished_meanwhile_yields_to_it(localoci, make_importer, bucket, web01,
                                                                        blockstorage, compartment_id,
                                                                        availability_domains, force):
    # this run found nothing, then waited (for a worker VM slot) while another run imported the version
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    theirs = tagged_volume(blockstorage, compartment_id, availability_domains[0], version, contract.STATE_IMPORTED,
                           str(uuid.uuid4()))
    options = importer.options(version, ImportOptions())
    image = importer.inspect(version, options)
    if force:  # a forced import makes its own volume whatever was imported
        with importer.run:
            worker, volume = importer.provision(version, image, options, PreviousImports(None, (), force=True))
            importer.run.terminate_worker(worker)
        assert volume.id != theirs.id
        blockstorage.delete_volume(volume.id)
    else:
        with pytest.raises(CompetingImport) as yielded:
            with importer.run:
                importer.provision(version, image, options, PreviousImports(None, ()))
        assert yielded.value.volume_id == theirs.id
        assert [v["id"] for v in live(localoci, "volumes", version)] == [theirs.id]
        assert importer.previous_imports(version).imported.id == theirs.id  # where the flow looks next
    assert live(localoci, "instances", version) == []
    blockstorage.delete_volume(theirs.id)


def test_a_yielding_run_is_not_retried_by_its_task():
    """A task retry would provision again, after the run it yielded to may be done: a second volume."""
    from prefect.states import Failed

    from flows.tasks import retry_unless_deterministic

    def failed_with(exc: Exception) -> Any:
        return Failed(data=exc)

    assert retry_unless_deterministic(None, None, failed_with(CompetingImport("run", "vol"))) is False
    assert retry_unless_deterministic(None, None, failed_with(ConnectionError("reset"))) is True


# -- options, settings and refusals -------------------------------------------------------------

def test_ad_number_picks_the_availability_domain_and_is_checked(make_importer, availability_domains):
    importer = make_importer()
    assert importer.run.availability_domains(3) == [availability_domains[2]]
    assert importer.run.availability_domains(None) == availability_domains
    with pytest.raises(InvalidRequest) as refused:
        importer.run.availability_domains(len(availability_domains) + 1)
    assert refused.value.code == "invalid-ad-number"


def test_blocks_refuse_invalid_settings(compartment_id):
    for bad in ({"vpus_during_import": 7}, {"vpus_after_import": 130}, {"transfer_connections": 0},
                {"transfer_chunk_mib": 2048}):
        with pytest.raises(pydantic.ValidationError):
            ImportSettings(compartment_id=compartment_id, **bad)
    with pytest.raises(pydantic.ValidationError):
        WorkerShape(compartment_id=compartment_id, subnet_id="s", image_id="i", attachment_type="nvme")
    with pytest.raises(pydantic.ValidationError, match="api_key needs tenancy_ocid, user_ocid"):
        OCICredentials(auth_type="api_key")
    secret = OCICredentials(auth_type="api_key", tenancy_ocid="t", user_ocid="u", fingerprint="f",
                            region="r", private_key="-----BEGIN PRIVATE KEY-----")
    assert "BEGIN PRIVATE KEY" not in repr(secret) and "BEGIN PRIVATE KEY" not in str(secret.model_dump())


def test_one_set_of_clients_reads_the_key_once_and_every_client_signs_with_it(credentials, compartment_id,
                                                                               monkeypatch):
    loaded = []
    load = oci.signer.load_private_key_from_file
    monkeypatch.setattr(oci.signer, "load_private_key_from_file", lambda *a: loaded.append(a) or load(*a))
    clients = credentials.clients()
    signers = {id(getattr(clients, service).base_client.signer) for service in
               ("compute", "blockstorage", "network", "object_storage", "identity")}
    assert len(signers) == 1 and len(loaded) == 1
    # signed with it, every service answers (the local OCI refuses a request without a signature)
    assert clients.identity.list_availability_domains(compartment_id).data
    assert clients.object_storage.get_namespace().data
    assert clients.compute.list_instances(compartment_id).status == 200
    assert clients.blockstorage.list_volumes(compartment_id=compartment_id).status == 200
    assert clients.network.list_vcns(compartment_id).status == 200


def test_a_block_naming_the_wrong_kind_of_resource_is_refused_before_anything_is_created(
        credentials, shape, compartment_id, subnet_id, blockstorage, availability_domains):
    volume = blockstorage.create_volume(oci.core.models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[0], size_in_gbs=50)).data
    settings = ImportSettings(compartment_id=compartment_id)
    cases = [
        (shape.model_copy(update={"subnet_id": volume.id}), settings, "WorkerShape.subnet_id", "of a block volume"),
        (shape.model_copy(update={"image_id": "not-an-ocid"}), settings, "WorkerShape.image_id", "is not an OCID"),
        (shape, ImportSettings(compartment_id=subnet_id), "ImportSettings.compartment_id", "of a subnet"),
    ]
    for worker_shape, import_settings, named, why in cases:  # no run exists to create anything with
        with pytest.raises(InvalidRequest) as refused:
            Run(credentials.clients(), import_settings, worker_shape, run_id=str(uuid.uuid4()))
        assert refused.value.code == "invalid-setting"
        assert refused.value.message.startswith(named) and why in refused.value.message
    target = TargetMachine(compartment_id=compartment_id, subnet_id=subnet_id, image_id=volume.id)
    with pytest.raises(InvalidRequest, match="^invalid-setting: TargetMachine.image_id .* of a block volume"):
        MachineImport(Importer(Run(credentials.clients(), settings, shape, run_id=str(uuid.uuid4()))), target)
    blockstorage.delete_volume(volume.id)


@pytest.mark.parametrize("case", ["object-not-found", "object-changed", "unknown-backup-policy",
                                  "invalid-setting", "too-large", "invalid-format", "invalid-vpus"])
def test_each_request_refusal_has_its_code(case, localoci, make_importer, bucket, web01):
    importer = make_importer(volume_name_template="{nope}")
    version = version_of(importer, localoci, bucket)
    attempts = {
        "object-not-found": lambda: importer.read_object(localoci.namespace, bucket, "missing.qcow2", None),
        "object-changed": lambda: importer.read_object(localoci.namespace, bucket, version.name, '"other"'),
        "unknown-backup-policy": lambda: cloud.backup_policy_id(importer.clients, "platinum"),
        "invalid-setting": lambda: importer.volume_name(version, ImportOptions()),
        "too-large": lambda: cloud.volume_size_gb(32769 * GiB),
        "invalid-format": lambda: importer.inspect(version, ImportOptions(format="iso")),
        "invalid-vpus": lambda: importer.options(version, contract.parse_options({"vpus": 15})),
    }
    with pytest.raises(contract.Refusal) as refused:
        attempts[case]()
    assert refused.value.code == case
    assert is_deterministic(refused.value)
    assert str(refused.value).startswith(f"{case}: ")


def test_metadata_options_apply_and_parameters_win(localoci, make_importer, bucket, object_storage, tmp_path):
    small = tmp_path / "meta.raw"
    small.write_bytes(os.urandom(2 * 1024 * 1024))
    with open(small, "rb") as f:
        object_storage.put_object(localoci.namespace, bucket, "meta.raw", f,
                                  opc_meta={"vpus": "30", "display_name": "from-metadata", "format": "raw"})
    importer = make_importer()
    version = version_of(importer, localoci, bucket, "meta.raw")
    options = importer.options(version, ImportOptions(vpus=0))
    assert (options.vpus, options.display_name, options.format) == (0, "from-metadata", "raw")
    assert importer.inspect(version, options).format == "raw"
    with pytest.raises(ImageRejected) as refused:
        importer.inspect(version, ImportOptions(format="qcow2"))
    assert refused.value.code == "claimed-format-mismatch"


# -- the unit a machine import repeats ----------------------------------------------------------

def test_two_objects_are_written_at_once_onto_two_volumes_of_one_worker_vm(
        localoci, make_importer, bucket, web01, object_storage, tmp_path, availability_domains):
    second = tmp_path / "second.raw"
    with open(second, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(5 * 1024 * 1024)
        f.write(os.urandom(3 * 1024 * 1024))
    with open(second, "rb") as f:
        object_storage.put_object(localoci.namespace, bucket, "team/data.raw", f)
    importer = make_importer()
    ad = availability_domains[0]
    versions = [version_of(importer, localoci, bucket), version_of(importer, localoci, bucket, "team/data.raw")]
    images = [importer.inspect(v, ImportOptions()) for v in versions]
    with importer.run:
        worker = importer.run.launch_worker(versions[0].subject, ad)
        volumes = [importer.create_volume(v, ad, 50, v.name.rsplit("/", 1)[-1]) for v in versions]
        with importer.run.session(worker) as session:
            importer.run.prepare_worker(session)
            writes = [importer.volume_write(session, worker, volume, version, image)
                      for volume, version, image in zip(volumes, versions, images)]
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda write: write.complete(), writes))
        assert {r.device for r, _ in results} == {w.device for w in writes} and len({w.device for w in writes}) == 2
        importer.run.terminate_worker(worker)
        assert volume_holds(localoci, volumes[0].id, web01[1])
        assert volume_holds(localoci, volumes[1].id, second)
        assert [a for a in localoci.inventory()["attachments"] if a["instanceId"] == worker.id] == []
    importer.run.ledger.unwind()
    assert all(live(localoci, "volumes", v) == [] for v in versions)


# -- machines: one worker VM, a volume per disk, written at once, kept together --------------------

def machine_ova(tmp_path: Path, wrong_digest_of: int | None = None) -> tuple[Path, list[Path]]:
    """A three-disk OVA as ovftool writes it (streamOptimized VMDKs, a SHA256 manifest); the raw disks."""
    from tests.diskimport.test_machine import make_ova, manifest_for, vmware_descriptor

    raws, vmdks = [], []
    for i, (size_mib, data_mib) in enumerate([(64, 6), (32, 3), (16, 1)]):
        raw = tmp_path / f"web-01-disk{i + 1}.raw"
        with open(raw, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
            f.seek((i + 1) * 1024 * 1024)
            f.write(os.urandom(data_mib * 1024 * 1024))
        vmdk = raw.with_suffix(".vmdk")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                        str(raw), str(vmdk)], check=True)
        raws.append(raw)
        vmdks.append((vmdk, size_mib))
    manifest = manifest_for([p for p, _ in vmdks])
    if wrong_digest_of is not None:
        line = manifest.splitlines()[wrong_digest_of]
        manifest = manifest.replace(line, line[:line.index("= ") + 2] + "0" * 64)
    return make_ova(tmp_path, "web-01", vmware_descriptor(vmdks), [p for p, _ in vmdks], manifest=manifest), raws


def write_machine(machine: MachineImport, plan: MachinePlan) -> tuple[Any, Any, Any]:
    """One worker VM, a volume per disk, every disk written and checked at once (the flow's order)."""
    worker = machine.provision(plan)
    with machine.run.session(worker) as session:
        machine.run.prepare_worker(session)
        writes = machine.writes(plan, session)
        with ThreadPoolExecutor(len(writes)) as pool:
            list(pool.map(lambda write: write.complete(), writes))
    return worker, plan.volumes, writes


def test_a_machines_disks_are_written_at_once_on_one_worker_vm_and_grouped(
        localoci, make_importer, bucket, object_storage, blockstorage, tmp_path):
    ova, raws = machine_ova(tmp_path)
    with open(ova, "rb") as f:
        object_storage.put_object(localoci.namespace, bucket, "machines/web-01.ova", f)
    localoci.admin("DELETE", "metrics")
    importer = make_importer()
    machine = MachineImport(importer)
    version = version_of(importer, localoci, bucket, "machines/web-01.ova")
    plan = machine.inspect(version)
    machine.reuse_imported(plan)
    images = [disk.image for disk in plan.disks]
    assert [(i.format, i.virtual_size, i.container) for i in images] == \
        [("vmdk", raw.stat().st_size, "tar") for raw in raws]
    with importer.run:
        worker, volumes, writes = write_machine(machine, plan)
        machine.finish_volumes(plan)
        group_id = machine.group_volumes(plan)
        importer.run.terminate_worker(worker)
    assert [disk.write for disk in plan.disks] == writes  # each disk's record carries its own write
    assert len({w.device for w in writes}) == 3  # three attachments, three device paths, one worker VM
    # each streamOptimized disk decoded by the streamer, every byte of it verified (runs read back, the rest zeros)
    assert all(w.result.verified_bytes == w.result.virtual_size and w.result.slices >= 1 for w in writes)
    assert all("second-opinion" not in w.result.phases for w in writes)
    # three transfers of one object, each with a PAR of its own name: a create that fails deletes
    # the PARs of its name it may have left, never another disk's
    assert len({importer.run.par_name(version.subject, w._part) for w in writes}) == 3
    assert [i["id"] for i in live(localoci, "instances", version)] == []
    assert all(volume_holds(localoci, volume.id, raw) for volume, raw in zip(volumes, raws))
    group = blockstorage.get_volume_group(group_id).data
    assert (group.display_name, sorted(group.volume_ids)) == ("web-01", sorted(v.id for v in volumes))
    tagged = {v["id"]: v["freeformTags"] for v in live(localoci, "volumes", version)}
    assert [tagged[v.id][contract.TAG_DISK] for v in volumes] == ["0", "1", "2"]
    assert {tagged[v.id][contract.TAG_MACHINE] for v in volumes} == {"web-01"}
    # every byte of the OVA fetched at most once: the inspection's pieces, then each disk's rest
    read = localoci.admin("GET", "metrics")["objectBytesRead"][f"{localoci.namespace}/{bucket}/machines/web-01.ova"]
    assert sum(i.inner_size for i in images) <= read <= ova.stat().st_size
    blockstorage.delete_volume_group(group_id)
    for volume in volumes:
        blockstorage.delete_volume(volume.id)


def test_a_disk_of_a_machine_that_does_not_match_its_digest_fails_naming_it_and_leaves_nothing(
        localoci, make_importer, bucket, object_storage, tmp_path):
    ova, _ = machine_ova(tmp_path, wrong_digest_of=1)
    with open(ova, "rb") as f:
        object_storage.put_object(localoci.namespace, bucket, "machines/bad.ova", f)
    importer = make_importer()
    machine = MachineImport(importer)
    version = version_of(importer, localoci, bucket, "machines/bad.ova")
    plan = machine.inspect(version)
    machine.reuse_imported(plan)
    with pytest.raises(ImageRejected, match="^ova-digest-mismatch: the bytes of 'web-01-disk2.vmdk' do not match"):
        with importer.run:
            write_machine(machine, plan)
    assert live(localoci, "volumes", version) == [] and live(localoci, "instances", version) == []


def test_a_retried_machine_import_removes_what_its_killed_attempt_left_half_written(
        localoci, make_importer, bucket, web01, blockstorage, compartment_id, availability_domains, active_runs,
        caplog):
    importer = make_importer()
    version = version_of(importer, localoci, bucket)
    ad = availability_domains[0]
    other = str(uuid.uuid4())
    active_runs.add(other)
    mine = tagged_volume(blockstorage, compartment_id, ad, version, contract.STATE_WRITING, importer.run.run_id)
    dead = tagged_volume(blockstorage, compartment_id, ad, version, contract.STATE_WRITING, str(uuid.uuid4()))
    finished = tagged_volume(blockstorage, compartment_id, ad, version, contract.STATE_IMPORTED, str(uuid.uuid4()))
    live_other = tagged_volume(blockstorage, compartment_id, ad, version, contract.STATE_WRITING, other)
    plan = MachinePlan(version, Machine("web01", "manifest", ()), [])
    assert sorted(MachineImport(importer).remove_unfinished_volumes(plan)) == sorted([mine.id, dead.id])
    assert sorted(v["id"] for v in live(localoci, "volumes", version)) == sorted([finished.id, live_other.id])
    for volume in (finished, live_other):
        blockstorage.delete_volume(volume.id)
