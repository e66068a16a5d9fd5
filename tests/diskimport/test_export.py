"""Exports through the core (:mod:`diskimport.export`), against the local OCI with the real SDK,
real sshd worker VMs and real qemu-img, without Prefect: every format round-trips bit-exact
(import, export, import), the written object says what a re-import needs, a fault mid-export
leaves nothing, and what cannot be exported is refused by name before anything exists.

``export_job`` runs the exporter's steps in the order the ``export-volume`` flow calls them.
"""

from __future__ import annotations

import hashlib
import os
import json
import subprocess
from pathlib import Path
from typing import Any

import oci
import pytest

from diskimport import contract
from diskimport.contract import InvalidRequest
from diskimport.errors import ImageRejected
from diskimport.export import Exporter, ExportJob
from diskimport.run import Run
from localoci.process import RunningLocalOCI
from tests.diskimport.conftest import everything, import_object, version_of
from tests import waiting

MiB = 1024 * 1024
pytestmark = pytest.mark.usefixtures("small_volumes", "no_faults")


@pytest.fixture(scope="module")
def source_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw disk with a GPT, an ext4 and data at its start, middle and end (a 1 GiB volume's worth)."""
    from diskimport.sample_disk import build_disk

    raw = tmp_path_factory.mktemp("export") / "source.raw"
    build_disk(raw, {"a.txt": b"alpha\n", "b.bin": bytes(range(256)) * 4096}, table="gpt")
    return raw


@pytest.fixture
def imported(localoci: RunningLocalOCI, blockstorage: Any, compartment_id: str, availability_domains: list[str],
             source_disk: Path) -> dict[str, Any]:
    """A 1 GB volume holding the disk, tagged as an import's (its ``volume_id``, ``availability_domain``)."""
    volume = blockstorage.create_volume(oci.core.models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[0], size_in_gbs=1,
        display_name="web01", freeform_tags={contract.TAG_STATE: contract.STATE_IMPORTED})).data
    waiting.wait_until(blockstorage, blockstorage.get_volume(volume.id), "lifecycle_state", "AVAILABLE",
                   max_wait_seconds=30, max_interval_seconds=0.1)
    subprocess.run(["dd", f"if={source_disk}", f"of={backing_file(localoci, volume.id)}", "conv=notrunc,sparse",
                    "bs=1M", "status=none"], check=True)
    return {"volume_id": volume.id, "availability_domain": availability_domains[0]}


def backing_file(localoci: RunningLocalOCI, volume_id: str) -> str:
    return next(v["backingFile"] for v in localoci.inventory()["volumes"] if v["id"] == volume_id)


def same_bytes(a: str, b: str) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b]).returncode == 0


def export_job(run: Run, job: ExportJob, overwrite: bool = False) -> dict[str, Any]:
    """The flow's order of steps, without Prefect."""
    exporter = Exporter(run)
    done = exporter.finished_objects(job, overwrite)
    todo = job.missing(done)
    exported = []
    if todo:
        with run:
            run.remove_stale_workers(job.subject)
            exporter.remove_stale_uploads(job)
            worker = run.launch_worker(job.subject, job.availability_domain)
            with run.session(worker) as session:
                run.prepare_worker(session)
                exported = exporter.export_all(session, worker, job, todo)
            run.terminate_worker(worker)
    return exporter.summary(job, exported, done, exporter.write_manifest(job)).as_dict()


def worker_vms(localoci: RunningLocalOCI, job: ExportJob) -> list[dict[str, Any]]:
    """The export's worker VMs that exist and are not on their way out (tagged as an import's are)."""
    return [i for i in localoci.inventory(**{contract.TAG_IMPORT_ID: job.subject.id})["instances"]
            if i["lifecycleState"] not in ("TERMINATING", "TERMINATED")]


def nothing_left(localoci: RunningLocalOCI, object_storage: Any, bucket: str, job: ExportJob) -> None:
    """No upload, part, PAR, object or worker VM of the export."""
    namespace = localoci.namespace
    assert object_storage.list_multipart_uploads(namespace, bucket).data == []
    names = [o.name for o in object_storage.list_objects(namespace, bucket).data.objects]
    assert not [n for n in names if n in job.objects or n.startswith(tuple(job.objects))]
    assert not [p for p in localoci.inventory()["pars"] if p["objectName"] in job.objects]
    assert worker_vms(localoci, job) == []


@pytest.mark.parametrize("fmt,compress,qemu_format", [
    ("qcow2", False, "qcow2"), ("qcow2", True, "qcow2"), ("vmdk", False, "vmdk"), ("vhdx", False, "vhdx"),
    ("vhd", False, "vpc"), ("raw", False, "raw")])
@pytest.mark.heavy
def test_every_format_round_trips_bit_exact(fmt, compress, qemu_format, localoci, make_run, make_importer,
                                            object_storage, bucket, imported, tmp_path):
    run = make_run()
    exporter = Exporter(run)
    job = exporter.plan(bucket, None, fmt, compress, volume_id=imported["volume_id"], prefix="out/")
    summary = export_job(run, job)
    [disk] = summary["disks"]
    name = job.objects[0]
    assert disk["object"] == name and name.startswith("out/") and name.endswith(f".{fmt}")

    # the object: what a re-import needs, its checksum beside it, nothing else left
    head = object_storage.head_object(localoci.namespace, bucket, name).headers
    assert head["opc-meta-format"] == fmt
    assert int(head["opc-meta-virtual-size"]) == 1024 ** 3 == disk["virtual_size"]
    assert head["opc-meta-exported-from"] == imported["volume_id"]
    local, digest = tmp_path / f"exported.{fmt}", hashlib.sha256()
    with open(local, "wb") as f:  # streamed: a raw or VHD export is the whole volume
        for chunk in object_storage.get_object(localoci.namespace, bucket, name).data.raw.stream(8 * MiB,
                                                                                                decode_content=False):
            digest.update(chunk)
            f.write(chunk)
    assert digest.hexdigest() == disk["sha256"]
    sidecar = object_storage.get_object(localoci.namespace, bucket, f"{name}.sha256").data.content.decode()
    assert sidecar == f"{disk['sha256']}  {name.split('/')[-1]}\n"
    with open(local, "rb") as f:
        head_bytes = f.read(64 * 1024)
        f.seek(-512, os.SEEK_END)
        footer = f.read()
    size = local.stat().st_size
    # qemu-img probes a fixed VHD as raw (its only cookie is in the footer): read it as what it claims to be
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", qemu_format, "--output=json", str(local)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == qemu_format and info["virtual-size"] == 1024 ** 3
    if fmt == "vmdk":
        assert b"createType=\"streamOptimized\"" in head_bytes
    if fmt == "vhd":
        assert footer[:8] == b"conectix" and size == 1024 ** 3 + 512  # fixed: data then footer
    if fmt in ("qcow2", "vmdk", "vhdx"):  # zeros neither stored nor uploaded (vhdx allocates 32 MiB blocks)
        assert size < (128 if fmt == "vhdx" else 64) * MiB
    if compress:
        assert size < 8 * MiB
    assert object_storage.list_multipart_uploads(localoci.namespace, bucket).data == []
    assert not [p for p in localoci.inventory()["pars"] if p["objectName"] == name]
    assert worker_vms(localoci, job) == [] and run.ledger.pending() == []
    assert not [a for a in localoci.inventory()["attachments"] if a["volumeId"] == imported["volume_id"]
                and a["lifecycleState"] != "DETACHED"]

    # re-imported: the same bytes
    again = make_importer()
    reimported = import_object(again, version_of(again, localoci, bucket, name))
    assert same_bytes(backing_file(localoci, imported["volume_id"]), backing_file(localoci, reimported["volume_id"]))

    # a repeat writes nothing new
    repeat = export_job(make_run(), job)
    assert repeat["disks"][0].get("reused") is True
    assert object_storage.head_object(localoci.namespace, bucket, name).headers["etag"] == disk["etag"]


@pytest.mark.heavy
@pytest.mark.parametrize("operation", ["ParUploadPart", "CommitMultipartUpload"])
def test_a_fault_mid_export_leaves_no_part_no_object_and_no_worker(operation, localoci, make_run,
                                                                   object_storage, bucket, imported):
    run = make_run()
    job = Exporter(run).plan(bucket, None, "qcow2", volume_id=imported["volume_id"], prefix="out/")
    localoci.admin("POST", "faults", {"operation": operation, "status": 400, "code": "InvalidParameter",
                                      "count": 100})
    with pytest.raises(Exception):
        export_job(run, job)
    localoci.admin("DELETE", "faults")
    nothing_left(localoci, object_storage, bucket, job)
    assert run.ledger.pending() == []
    # the source volume is untouched and free again
    assert not [a for a in localoci.inventory()["attachments"] if a["volumeId"] == imported["volume_id"]
                and a["lifecycleState"] != "DETACHED"]


def test_what_cannot_be_exported_is_refused_by_name_before_anything_exists(localoci, make_run, shape,
                                                                           object_storage, bucket, imported):
    exporter = Exporter(make_run())
    volume_id = imported["volume_id"]
    cases = [
        (dict(format="qcow3", volume_id=volume_id), "invalid-export-format"),
        (dict(format="vmdk", compress=True, volume_id=volume_id), "invalid-export-format"),
        (dict(format="qcow2"), "invalid-source"),
        (dict(format="qcow2", volume_id="ocid1.volume.oc1..missing"), "volume-not-found"),
        (dict(format="qcow2", volume_id=volume_id, object_name="out/../x.qcow2"), "invalid-object-name"),
        (dict(format="qcow2", volume_id=volume_id, object_name="out/web01.txt"), "invalid-object-name"),
    ]
    for kwargs, code in cases:
        with pytest.raises(InvalidRequest) as refused:
            exporter.plan(bucket, None, **kwargs)
        assert refused.value.code == code, kwargs
    object_storage.put_object(localoci.namespace, bucket, "out/taken.qcow2", b"someone else's")
    job = exporter.plan(bucket, None, "qcow2", volume_id=volume_id, object_name="out/taken.qcow2")
    with pytest.raises(InvalidRequest, match="^object-exists: "):
        exporter.finished_objects(job)
    assert exporter.finished_objects(job, overwrite=True) == {}
    assert worker_vms(localoci, job) == []
    iscsi = make_run()
    iscsi.shape = shape.model_copy(update={"attachment_type": "iscsi"})
    with pytest.raises(InvalidRequest, match="^iscsi-export-unsupported: "):
        Exporter(iscsi).plan(bucket, None, "qcow2", volume_id=volume_id)


def test_a_source_named_by_the_wrong_ocid_or_not_found_is_refused_before_anything_exists(
        localoci, make_run, object_storage, blockstorage, bucket, imported, compartment_id):
    """A volume's OCID given as the group, a group's as the volume, something that is no OCID, a
    group or a bucket that does not exist: each refused with its code and a message that names the
    parameter, what it got and what it takes (never OCI's bare 404), and nothing is created."""
    volume_id = imported["volume_id"]
    group = blockstorage.create_volume_group(oci.core.models.CreateVolumeGroupDetails(
        compartment_id=compartment_id, availability_domain=imported["availability_domain"], display_name="web",
        source_details=oci.core.models.VolumeGroupSourceFromVolumesDetails(volume_ids=[volume_id]))).data
    waiting.wait_until(blockstorage, blockstorage.get_volume_group(group.id), "lifecycle_state", "AVAILABLE",
                   max_wait_seconds=30, max_interval_seconds=0.1)
    volumes = "a block volume (ocid1.volume.…) or a boot volume (ocid1.bootvolume.…)"
    cases = [
        (dict(volume_group_id=volume_id), "invalid-source", f"volume_group_id {volume_id!r} is the OCID of a block "
         "volume, not of a volume group (ocid1.volumegroup.…): pass it as volume_id"),
        (dict(volume_id=group.id), "invalid-source", f"volume_id {group.id!r} is the OCID of a volume group, not of "
         f"{volumes}: pass it as volume_group_id"),
        (dict(volume_id="vol-0123"), "invalid-source", f"volume_id 'vol-0123' is not an OCID; it takes the OCID of "
         f"{volumes}"),
        (dict(volume_group_id="ocid1.volumegroup"), "invalid-source", "volume_group_id 'ocid1.volumegroup' is not an "
         "OCID; it takes the OCID of a volume group (ocid1.volumegroup.…)"),
        (dict(volume_group_id="ocid1.volumegroup.oc1..missing"), "volume-group-not-found",
         "volume group ocid1.volumegroup.oc1..missing not found"),
    ]
    exporter = Exporter(make_run())
    before = everything(localoci)
    for kwargs, code, message in cases:
        with pytest.raises(InvalidRequest) as refused:
            exporter.plan(bucket, None, "qcow2", **kwargs)
        assert (refused.value.code, refused.value.message[:len(message)]) == (code, message)
    with pytest.raises(InvalidRequest, match="^bucket-not-found: bucket 'no-such-bucket' not found in namespace "):
        exporter.plan("no-such-bucket", None, "qcow2", volume_id=volume_id)
    assert everything(localoci) == before
    assert object_storage.list_objects(localoci.namespace, bucket).data.objects == []
    blockstorage.delete_volume_group(group.id)


def test_an_attached_volume_is_refused(localoci, make_run, bucket, imported, compute, compartment_id,
                                       availability_domains, subnet_id):
    run = make_run()
    from tests.workers import WORKER_IMAGE_ID

    instance = compute.launch_instance(oci.core.models.LaunchInstanceDetails(
        compartment_id=compartment_id, availability_domain=imported["availability_domain"],
        shape="VM.Standard.E4.Flex", source_details=oci.core.models.InstanceSourceViaImageDetails(
            image_id=WORKER_IMAGE_ID), create_vnic_details=oci.core.models.CreateVnicDetails(subnet_id=subnet_id),
        freeform_tags={contract.TAG_MANAGED_BY: "test"})).data
    waiting.wait_until(compute, compute.get_instance(instance.id), "lifecycle_state", "RUNNING", max_wait_seconds=30,
                   max_interval_seconds=0.1)
    try:
        attachment = compute.attach_volume(oci.core.models.AttachParavirtualizedVolumeDetails(
            instance_id=instance.id, volume_id=imported["volume_id"])).data
        waiting.wait_until(compute, compute.get_volume_attachment(attachment.id), "lifecycle_state", "ATTACHED",
                       max_wait_seconds=30, max_interval_seconds=0.1)
        with pytest.raises(InvalidRequest, match=f"^volume-attached: volume {imported['volume_id']} is attached to "
                                                 f"{instance.id}"):
            Exporter(run).plan(bucket, None, "raw", volume_id=imported["volume_id"])
    finally:
        compute.terminate_instance(instance.id)


def test_an_object_that_does_not_read_back_as_exported_is_removed(localoci, make_run, object_storage, bucket,
                                                                  imported):
    """The written object is read again as an import reads it: one that does not read back as the
    format and size exported fails the export (here: the volume claims another size)."""
    run = make_run()
    exporter = Exporter(run)
    job = exporter.plan(bucket, None, "qcow2", volume_id=imported["volume_id"], prefix="out/")
    source = job.sources[0]
    wrong = ExportJob(**{**job.__dict__, "sources": (type(source)(**{**source.__dict__,
                                                                    "size_bytes": 2 * 1024 ** 3}),)})
    with pytest.raises(ImageRejected, match="^export-inspection-mismatch: "):
        export_job(run, wrong)
    nothing_left(localoci, object_storage, bucket, job)


@pytest.mark.heavy
def test_an_object_written_but_never_checked_is_written_again(localoci, make_run, object_storage, bucket,
                                                              imported):
    """A run that died between the commit and the check (no ``.sha256`` beside the object) left an
    object of this export that nobody inspected: the next run writes it again."""
    job = Exporter(make_run()).plan(bucket, None, "qcow2", volume_id=imported["volume_id"], prefix="out/")
    first = export_job(make_run(), job)["disks"][0]
    object_storage.delete_object(localoci.namespace, bucket, f"{job.objects[0]}.sha256")
    again = export_job(make_run(), job)["disks"][0]
    assert not again.get("reused") and again["etag"] != first["etag"] and again["sha256"] == first["sha256"]
    assert object_storage.head_object(localoci.namespace, bucket, f"{job.objects[0]}.sha256").status == 200


@pytest.mark.parametrize("compress", [False, True])
def test_the_qcow2_ranges_qemu_img_may_rewrite_are_all_but_its_data(tmp_path, compress):
    """What the uploader reads again once a qcow2 is final: every cluster of the file that holds
    no data (header, L1, refcount table and blocks, L2 tables), and no data cluster."""
    from diskimport.export import qcow2_metadata

    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(3 * 1024 ** 3)
        for offset in (0, 700 * MiB, 2 * 1024 ** 3 + 5 * MiB):
            f.seek(offset)
            f.write(os.urandom(3 * MiB) if not compress else b"compressible " * 300_000)
    image = tmp_path / "out.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []), str(raw),
                    str(image)], check=True)
    data = image.read_bytes()
    ranges = qcow2_metadata(lambda start, length: data[start:start + length])
    mapped = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True,
                                       text=True, check=True).stdout)
    cluster = 64 * 1024
    if not compress:  # map shows where uncompressed data lies
        data_clusters = {o // cluster for m in mapped if m.get("data") and "offset" in m
                         for o in range(m["offset"], m["offset"] + m["length"], cluster)}
        meta_clusters = {o // cluster for a, b in ranges for o in range(a, b, cluster)}
        assert not data_clusters & meta_clusters
        assert data_clusters | meta_clusters == set(range(-(-len(data) // cluster)))
    assert len([r for r in ranges if r[1] - r[0] == cluster]) >= 3 + 1  # header, 3 L2 tables, refcount blocks
    with pytest.raises(ImageRejected, match="^export-convert-failed: "):
        qcow2_metadata(lambda start, length: b"\0" * length)


def test_a_dead_runs_uploads_are_aborted_and_no_other_runs(localoci, credentials, object_storage, bucket):
    """The crash hook's cleanup finds the run's uploads by its write PARs: another upload in the
    same bucket (another run's, or someone else's) is left alone."""
    import datetime as dt

    from diskimport import cloud
    from diskimport.worker_vm import upload
    from diskimport.export import remove_run_uploads

    clients = credentials.clients()
    made = {}
    for run, name in (("dead-run", "out/dead.qcow2"), ("live-run", "out/live.qcow2")):
        par_id, uri = cloud.object_par(clients, localoci.namespace, bucket, name, dt.timedelta(hours=1),
                                       f"oci-disk-export-{'0' * 24}-{run}-{'1' * 12}", "ObjectWrite")
        made[run] = (par_id, upload.create_par_upload(localoci.endpoint + uri, {"format": "qcow2"})["uploadId"])
    object_storage.create_multipart_upload(localoci.namespace, bucket, oci.object_storage.models.
                                           CreateMultipartUploadDetails(object="someone-elses.bin"))
    assert remove_run_uploads(clients, localoci.namespace, bucket, "dead-run") == [made["dead-run"][1]]
    left = {u.object for u in object_storage.list_multipart_uploads(localoci.namespace, bucket).data}
    assert left == {"out/live.qcow2", "someone-elses.bin"}
    pars = {p.id for p in object_storage.list_preauthenticated_requests(localoci.namespace, bucket).data}
    assert made["dead-run"][0] not in pars and made["live-run"][0] in pars
