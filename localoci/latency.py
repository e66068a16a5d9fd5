"""Latency profiles: how long the local OCI's lifecycle transitions take, as in a tenancy.

The local OCI moves a resource to its next state in 50 ms. A real region takes minutes to
launch an instance, so what overlaps with provisioning (creating volumes while the worker
boots, a fleet's runs queueing for worker VMs) is only measured as it would be with the
transitions slowed to real durations. A profile maps ``<kind>:<TARGET_STATE>`` (the keys of
``/_localoci/latency``) to the seconds added to that transition.

``oci``: Oracle publishes no measured figures in seconds. Its own wording and bounds:

- launch to RUNNING: "Expect provisioning to take several minutes before the state updates
  to running" (Oracle Cloud Infrastructure documentation, "Creating Your First Linux
  Instance", and the same sentence in Compute Cloud@Customer and Private Cloud Appliance's
  instance lifecycle pages): 120 s, the low end of "several minutes";
- RUNNING to SSH: "After the instance is running, allow another few minutes for the
  operating system to boot before you attempt to connect" (the same pages): 60 s before the
  worker's sshd answers (``instance:BOOTED``), the low end of "a few minutes" for a small
  Linux worker;
- volume create, attach, detach, terminate and delete: no published duration. The bounds are
  the OCI SDK's, CLI's and Ansible collection's default wait (1,200 s) and the Terraform
  provider's default timeouts (volumes and volume attachments 20 min, instances 45 min to
  create and 75 min to delete). The values below are this project's assumptions, well inside
  those bounds: a volume 15 s to AVAILABLE, an attachment 10 s to ATTACHED and 10 s to
  DETACHED, an instance 30 s to TERMINATED, a boot volume 15 s.
- backups: no published duration either (OCI says a backup's time depends on the data
  written, and a cross-region copy on the data and the distance). Assumed: a volume or boot
  volume backup 60 s to AVAILABLE, a copy to another region 120 s, a volume group backup
  90 s and its copy 180 s; deleting any of them 10 s. Restores take the volume, boot volume
  and volume group transitions above. The local copy of the files is inside these delays
  (a backup is AVAILABLE once both its copy and its delay are done).
"""

from __future__ import annotations

PROFILES: dict[str, dict[str, float]] = {
    "none": {},
    "oci": {
        "instance:RUNNING": 120.0,
        "instance:BOOTED": 60.0,
        "instance:STOPPED": 30.0,
        "instance:TERMINATED": 30.0,
        "volume:AVAILABLE": 15.0,
        "volume:TERMINATED": 10.0,
        "bootvolume:AVAILABLE": 15.0,
        "bootvolume:TERMINATED": 10.0,
        "attachment:ATTACHED": 10.0,
        "attachment:DETACHED": 10.0,
        "bootvolumeattachment:ATTACHED": 10.0,
        "bootvolumeattachment:DETACHED": 10.0,
        "volumegroup:AVAILABLE": 10.0,
        "volumegroup:TERMINATED": 10.0,
        "volumebackup:AVAILABLE": 60.0,
        "volumebackupcopy:AVAILABLE": 120.0,
        "volumebackup:TERMINATED": 10.0,
        "bootvolumebackup:AVAILABLE": 60.0,
        "bootvolumebackupcopy:AVAILABLE": 120.0,
        "bootvolumebackup:TERMINATED": 10.0,
        "volumegroupbackup:AVAILABLE": 90.0,
        "volumegroupbackupcopy:AVAILABLE": 180.0,
        "volumegroupbackup:TERMINATED": 10.0,
    },
}


def profile(name: str) -> dict[str, float]:
    """The transitions' added seconds of profile ``name``; a clear error naming the known ones."""
    try:
        return dict(PROFILES[name])
    except KeyError:
        raise ValueError(f"unknown latency profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
