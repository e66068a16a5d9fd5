"""Shared fixtures: one real local OCI server per test process, real SDK clients."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import oci
import pytest

from localoci import process
from diskimport.keys import SshKeyPair as KeyPair

ROOT = Path(__file__).resolve().parent.parent

# Every stack the suite starts (one per end-to-end module and worker, the fleet's, make up's) has
# its Prefect worker ask for runs each second, not every 0.25 s: at 0.25 s each stack's server
# spent about 12% of a core on the asking alone, and the suite's stacks together a whole core
# of the two. Runs start up to a second later; nothing the tests check depends on it.
os.environ.setdefault("LOCAL_STACK_POLL_SECONDS", "1")


@pytest.fixture(scope="session")
def localoci(tmp_path_factory: pytest.TempPathFactory) -> Iterator[process.RunningLocalOCI]:
    server = process.start(tmp_path_factory.mktemp("localoci"), regions=["local-1", "local-2"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def oci_config(localoci: process.RunningLocalOCI) -> dict[str, Any]:
    return oci.config.from_file(localoci.oci_config_file, localoci.oci_profile)


@pytest.fixture(scope="session")
def compartment_id(localoci: process.RunningLocalOCI) -> str:
    return localoci.tenancy_id


@pytest.fixture(scope="session")
def object_storage(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.object_storage.ObjectStorageClient:
    return oci.object_storage.ObjectStorageClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def compute(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.core.ComputeClient:
    return oci.core.ComputeClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def blockstorage(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.core.BlockstorageClient:
    return oci.core.BlockstorageClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def network(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.core.VirtualNetworkClient:
    return oci.core.VirtualNetworkClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def identity(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.identity.IdentityClient:
    return oci.identity.IdentityClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def availability_domains(identity: oci.identity.IdentityClient, compartment_id: str) -> list[str]:
    return [ad.name for ad in identity.list_availability_domains(compartment_id).data]


@pytest.fixture(scope="session")
def subnet_id(network: oci.core.VirtualNetworkClient, compartment_id: str) -> str:
    models = oci.core.models
    vcn = network.create_vcn(models.CreateVcnDetails(compartment_id=compartment_id, cidr_block="10.0.0.0/16")).data
    return network.create_subnet(
        models.CreateSubnetDetails(compartment_id=compartment_id, vcn_id=vcn.id, cidr_block="10.0.0.0/24")
    ).data.id


def empty_bucket(client: oci.object_storage.ObjectStorageClient, namespace: str, bucket: str) -> None:
    """Delete every object and open multipart upload: test images take gigabytes of the disk."""
    try:
        client.get_bucket(namespace, bucket)
    except oci.exceptions.ServiceError as e:
        if e.status == 404:  # the test removed it itself
            return
        raise
    for upload in oci.pagination.list_call_get_all_results(client.list_multipart_uploads, namespace, bucket).data:
        client.abort_multipart_upload(namespace, bucket, upload.object, upload.upload_id)
    for summary in oci.pagination.list_call_get_all_results(client.list_objects, namespace, bucket).data.objects:
        client.delete_object(namespace, bucket, summary.name)


@pytest.fixture
def bucket(object_storage: oci.object_storage.ObjectStorageClient, localoci: process.RunningLocalOCI,
           compartment_id: str) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    object_storage.create_bucket(
        localoci.namespace,
        oci.object_storage.models.CreateBucketDetails(name=name, compartment_id=compartment_id, object_events_enabled=True),
    )
    yield name
    empty_bucket(object_storage, localoci.namespace, name)


@pytest.fixture(scope="session")
def client_key() -> KeyPair:
    return KeyPair.generate()


# The modules that take minutes (each starts a stack, boots machines or builds the function) go
# first: with --dist loadfile, xdist hands out modules in collection order, and a long module
# handed out last would run alone at the end while the other workers sit idle.
SLOW_FIRST = ("tests/e2e/", "tests/test_local_stack.py", "tests/trigger/")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(SLOW_FIRST))  # stable: file order kept within
