"""sweep-orphans removes what a dead run left, and never an imported volume."""

from __future__ import annotations

import uuid

import oci

from deployments import local_stack
from diskimport import naming
from diskimport.keys import SshKeyPair, cloud_init_host_keys
from tests.e2e.conftest import live_inventory


def test_sweep_removes_workers_and_unfinished_volumes_of_dead_runs_only(stack):
    config = oci.config.from_file(stack["OCI_CONFIG_FILE"], stack["OCI_PROFILE"])
    compute = oci.core.ComputeClient(config, service_endpoint=stack["LOCALOCI_ENDPOINT"])
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=stack["LOCALOCI_ENDPOINT"])
    models = oci.core.models
    dead_run = str(uuid.uuid4())
    tags = {naming.TAG_MANAGED_BY: naming.MANAGED_BY, naming.TAG_FLOW_RUN: dead_run, naming.TAG_IMPORT_ID: "sweep"}
    ad = "local:LOCAL-AD-3"
    worker = compute.launch_instance(models.LaunchInstanceDetails(
        compartment_id=stack["COMPARTMENT_ID"], availability_domain=ad, shape="VM.Standard.E4.Flex",
        shape_config=models.LaunchInstanceShapeConfigDetails(ocpus=1, memory_in_gbs=16),
        source_details=models.InstanceSourceViaImageDetails(image_id=stack["IMAGE_ID"]),
        create_vnic_details=models.CreateVnicDetails(subnet_id=stack["SUBNET_ID"]),
        metadata={"ssh_authorized_keys": SshKeyPair.generate().public_openssh,
                  "user_data": cloud_init_host_keys(SshKeyPair.generate())},
        freeform_tags=tags)).data
    unfinished = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=stack["COMPARTMENT_ID"], availability_domain=ad, size_in_gbs=50,
        freeform_tags={**tags, naming.TAG_STATE: naming.STATE_WRITING})).data
    imported = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=stack["COMPARTMENT_ID"], availability_domain=ad, size_in_gbs=50,
        freeform_tags={**tags, naming.TAG_STATE: naming.STATE_IMPORTED})).data
    unmanaged = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=stack["COMPARTMENT_ID"], availability_domain=ad, size_in_gbs=50,
        freeform_tags={naming.TAG_FLOW_RUN: dead_run})).data
    oci.wait_until(compute, compute.get_instance(worker.id), "lifecycle_state", "RUNNING", max_wait_seconds=60)
    for volume in (unfinished, imported, unmanaged):
        oci.wait_until(blockstorage, blockstorage.get_volume(volume.id), "lifecycle_state", "AVAILABLE",
                       max_wait_seconds=60)

    from flows.sweep import sweep_orphans

    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        removed = sweep_orphans(min_age_minutes=0)

    assert worker.id in removed["instances"]
    assert unfinished.id in removed["volumes"]
    live = live_inventory(stack)
    live_volumes = {v["id"] for v in live["volumes"]}
    assert worker.id not in {i["id"] for i in live["instances"]}
    assert unfinished.id not in live_volumes
    assert {imported.id, unmanaged.id} <= live_volumes
    for volume in (imported, unmanaged):
        blockstorage.delete_volume(volume.id)
