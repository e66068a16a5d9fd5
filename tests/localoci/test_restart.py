"""A restart of the local OCI keeps every resource, and running workers come back."""

from __future__ import annotations

import datetime as dt
import getpass
import socket

import httpx
import oci

from localoci import process
from diskimport.keys import SshKeyPair as KeyPair
from tests.workers import connect, launch_details
from tests import waiting

models = oci.core.models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(client, response, state):
    return waiting.wait_until(client, response, "lifecycle_state", state, max_wait_seconds=30, max_interval_seconds=0.2).data


def test_restart_keeps_every_resource_and_restarts_running_workers(tmp_path, client_key):
    port = _free_port()
    server = process.start(tmp_path / "data", port=port)
    try:
        config = oci.config.from_file(server.oci_config_file, server.oci_profile)
        ep = server.endpoint
        os_client = oci.object_storage.ObjectStorageClient(config, service_endpoint=ep)
        compute = oci.core.ComputeClient(config, service_endpoint=ep)
        bs = oci.core.BlockstorageClient(config, service_endpoint=ep)
        net = oci.core.VirtualNetworkClient(config, service_endpoint=ep)
        compartment, ns = server.tenancy_id, server.namespace

        os_client.create_bucket(ns, oci.object_storage.models.CreateBucketDetails(name="keep", compartment_id=compartment))
        etag = os_client.put_object(ns, "keep", "disk.qcow2", b"image-bytes").headers["etag"]
        par = os_client.create_preauthenticated_request(ns, "keep", oci.object_storage.models.CreatePreauthenticatedRequestDetails(
            name="p", object_name="disk.qcow2", access_type="ObjectRead",
            time_expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))).data
        vcn = net.create_vcn(models.CreateVcnDetails(compartment_id=compartment, cidr_block="10.0.0.0/16")).data
        subnet = net.create_subnet(models.CreateSubnetDetails(compartment_id=compartment, vcn_id=vcn.id, cidr_block="10.0.0.0/24")).data
        host_key = KeyPair.generate()
        ad = "local:LOCAL-AD-1"
        instance = compute.launch_instance(launch_details(compartment, ad, subnet.id, client_key, host_key)).data
        volume = bs.create_volume(models.CreateVolumeDetails(compartment_id=compartment, availability_domain=ad, size_in_gbs=50)).data
        _wait(bs, bs.get_volume(volume.id), "AVAILABLE")
        group = bs.create_volume_group(models.CreateVolumeGroupDetails(
            compartment_id=compartment, availability_domain=ad,
            source_details=models.VolumeGroupSourceFromVolumesDetails(volume_ids=[volume.id]))).data
        _wait(bs, bs.get_volume_group(group.id), "AVAILABLE")
        _wait(compute, compute.get_instance(instance.id), "RUNNING")
        attachment = compute.attach_volume(models.AttachParavirtualizedVolumeDetails(instance_id=instance.id, volume_id=volume.id)).data
        attachment = _wait(compute, compute.get_volume_attachment(attachment.id), "ATTACHED")
        address = server.inventory()["instances"][0]["sshAddress"]
        with connect(address, server.ssh_port, getpass.getuser(), client_key, host_key) as conn:
            conn.run(f"printf persisted | dd of={attachment.device} conv=notrunc status=none")
        before = server.inventory()
    finally:
        server.stop()

    server = process.start(tmp_path / "data", port=port)
    try:
        assert server.namespace == ns and server.ssh_port == before["instances"][0]["sshPort"]
        after = server.inventory()
        for kind in ("instances", "volumes", "volumeGroups", "attachments", "pars"):
            assert {r["id"]: r["lifecycleState"] if "lifecycleState" in r else r["timeExpires"] for r in after[kind]} == \
                   {r["id"]: r["lifecycleState"] if "lifecycleState" in r else r["timeExpires"] for r in before[kind]}, kind
        config = oci.config.from_file(server.oci_config_file, server.oci_profile)
        os_client = oci.object_storage.ObjectStorageClient(config, service_endpoint=server.endpoint)
        got = os_client.get_object(ns, "keep", "disk.qcow2")
        assert got.data.content == b"image-bytes" and got.headers["etag"] == etag
        assert httpx.get(server.endpoint + par.access_uri).content == b"image-bytes"
        bs = oci.core.BlockstorageClient(config, service_endpoint=server.endpoint)
        assert bs.get_volume_group(group.id).data.volume_ids == [volume.id]
        assert bs.get_volume(volume.id).data.volume_group_id == group.id
        with connect(address, server.ssh_port, getpass.getuser(), client_key, host_key) as conn:
            assert conn.run(f"head -c 9 {attachment.device}", hide=True).stdout == "persisted"
    finally:
        server.stop()
    # A stopped server leaves no sshd behind.
    with socket.socket() as s:
        assert s.connect_ex((address, before["instances"][0]["sshPort"])) != 0



def test_stopping_processes_signals_them_all_and_kills_each_that_lingers_past_its_own_timeout():
    import os
    import signal
    import subprocess

    def ignoring_term() -> subprocess.Popen[bytes]:
        shell = subprocess.Popen(["bash", "-c", "trap '' TERM; echo ready; sleep 300 >/dev/null & wait"],
                                 stdout=subprocess.PIPE, start_new_session=True)
        assert shell.stdout.readline() == b"ready\n"  # its trap is set
        return shell

    polite = subprocess.Popen(["sleep", "300"])
    stubborn, slower = ignoring_term(), ignoring_term()
    try:
        process.stop_pids([polite.pid, stubborn.pid, slower.pid], timeout=2, timeouts={stubborn.pid: 0.5})
        assert not any(process.alive(p.pid) for p in (polite, stubborn, slower))  # it returns once all are gone
        assert polite.wait(timeout=10) == -signal.SIGTERM  # went when asked
        assert stubborn.wait(timeout=10) == -signal.SIGKILL and slower.wait(timeout=10) == -signal.SIGKILL
    finally:
        for p in (polite, stubborn, slower):
            p.kill()
            p.wait()
        for shell in (stubborn, slower):  # and the sleep each started
            try:
                os.killpg(shell.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stopping_a_group_leader_stops_what_it_forked_even_a_child_that_ignores_the_signal():
    """The local stack's warm runner forks its flow runs: stopping it must stop runs in flight."""
    import os
    import signal
    import subprocess

    leader = subprocess.Popen(["bash", "-c", "(trap '' TERM; exec sleep 300) & echo $!; wait"],
                              stdout=subprocess.PIPE, start_new_session=True)
    child = int(leader.stdout.readline())
    try:
        assert process.alive(child) and os.getpgid(child) == leader.pid
        process.stop_pids([leader.pid], timeout=1, groups={leader.pid})
        assert leader.wait(timeout=10) == -signal.SIGTERM  # the leader went when asked
        assert not process.alive(child) and not process.group_alive(leader.pid)  # its child after SIGKILL
    finally:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        leader.wait()
