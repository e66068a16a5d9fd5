"""Launch local OCI instances and reach them over SSH with a pinned host key."""

from __future__ import annotations

from typing import Any

import fabric
import oci
import paramiko

from diskimport.keys import SshKeyPair as KeyPair, cloud_init_host_keys

WORKER_IMAGE_ID = "ocid1.image.oc1..localoci-worker"


def launch_details(compartment_id: str, availability_domain: str, subnet_id: str, client_key: KeyPair,
                   host_key: KeyPair | None = None, **extra: Any) -> oci.core.models.LaunchInstanceDetails:
    models = oci.core.models
    metadata = {"ssh_authorized_keys": client_key.public_openssh}
    if host_key is not None:
        metadata["user_data"] = cloud_init_host_keys(host_key)
    return models.LaunchInstanceDetails(
        compartment_id=compartment_id,
        availability_domain=availability_domain,
        shape="VM.Standard.E4.Flex",
        shape_config=models.LaunchInstanceShapeConfigDetails(ocpus=1, memory_in_gbs=16),
        source_details=models.InstanceSourceViaImageDetails(image_id=WORKER_IMAGE_ID),
        create_vnic_details=models.CreateVnicDetails(subnet_id=subnet_id),
        metadata=metadata,
        **extra,
    )


def connect(address: str, port: int, user: str, client_key: KeyPair, host_key: KeyPair) -> fabric.Connection:
    """A fabric connection that accepts only ``host_key`` from the server."""
    conn = fabric.Connection(
        address, user=user, port=port,
        connect_kwargs={"pkey": client_key.pkey(), "look_for_keys": False, "allow_agent": False},
        connect_timeout=10,
        config=fabric.Config(overrides={"run": {"in_stream": False}}),
    )
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pinned = host_key.pkey()
    conn.client.get_host_keys().add(f"[{address}]:{port}", pinned.get_name(), pinned)
    return conn
