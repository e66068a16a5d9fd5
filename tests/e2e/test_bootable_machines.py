"""Bootable machines end to end: the boot disk on a boot volume, the machine started from it,
its boot seen through the console history. The disks boot Debian's cloud kernel for real
(tests/boot_disks.py), under qemu in the local OCI. A Debian guest shaped as it leaves VMware
(tests/linux_guests.py) is imported without a launch, for its guest report and the launch options
chosen from it, and adapted, where its stub initramfs tool fails the adaptation. Debian machines
built from Debian's packages as they leave VMware (tests/debian_guests.py, BIOS and UEFI with an
LVM root) are launched on virtio unadapted (they do not come up) and adapted (they boot to
systemd's login prompt and their sshd answers). On a stack of its own: it changes the stack's
target-machine block and runs the sweeper over every managed resource of the compartment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import oci
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from deployments import demo, local_stack
from diskimport.sample_disk import convert
from tests import debian_guests, guest_disks, linux_guests
from tests.e2e.conftest import MANUAL_BUCKET, SUFFIX, Disk, admin, image_of, resources_of, run_import

# The module fixture's slow part (seven machine imports, four of them booted under TCG) runs once, within the first
# test's time budget: under the whole suite on two cores it has taken about 8 minutes.
# A stack of its own, as its sweep test sweeps every managed resource; on SQLite, as nothing here
# needs the reconciler.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.own_stack(database="sqlite")]

MACHINE = "import-machine/default"


SHORT_CHECK = "short-boot-check"
LAUNCH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBootDiskLaunchKeyForTheMetadataService launch@import"
NO_CHECK = "no-boot-check"
VIRTIO_UNADAPTED = "virtio-unadapted"


@pytest.fixture(scope="module")
def boot_imports(stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests import boot_disks
    from tests.diskimport.test_machine import make_ova, manifest_for, vmware_descriptor

    missing = boot_disks.tools_missing()
    if missing:
        pytest.skip(f"boot disk tools missing: {missing}")
    tmp = tmp_path_factory.mktemp("boot")
    built = boot_disks.build_all(tmp / "disks")
    if not linux_guests.tools_missing():  # a Linux guest as it leaves VMware, for the guest report
        (tmp / "vmware").mkdir()
        built["vmware"] = linux_guests.vmware_debian(tmp / "vmware.raw", tmp / "vmware").disk
    data = guest_disks.whole_device_ext4(tmp / "data.raw")
    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        from blocks import TargetMachine

        target = TargetMachine.load(local_stack.BLOCKS["target"])
        target.ssh_authorized_keys = LAUNCH_KEY  # served to the machines by the instance metadata service
        target.save(local_stack.BLOCKS["target"], overwrite=True)
        short = TargetMachine.load(local_stack.BLOCKS["target"])
        short.boot_timeout_seconds = 20
        short.save(SHORT_CHECK, overwrite=True)
        short.boot_check = "require"
        short.save(SHORT_CHECK + "-required", overwrite=True)
        short.boot_check = "off"
        short.save(NO_CHECK, overwrite=True)
        unadapted = TargetMachine.load(local_stack.BLOCKS["target"])  # virtio asked for, whatever the report says
        unadapted.boot_volume_type, unadapted.network_type = "PARAVIRTUALIZED", "PARAVIRTUALIZED"
        unadapted.boot_timeout_seconds, unadapted.reach_timeout_seconds = 60, 0
        unadapted.save(VIRTIO_UNADAPTED, overwrite=True)

    def ova(name: str, disk: Path, firmware: str) -> Path:
        """An OVA whose descriptor gives the firmware (VMware's ``firmware`` config: efi or bios)."""
        vmdk = convert(disk, tmp / f"{name}-disk1.vmdk", "vmdk", "subformat=streamOptimized")
        work = tmp / name
        work.mkdir()
        pairs = [(vmdk, disk.stat().st_size // (1024 * 1024))]
        descriptor = vmware_descriptor(pairs).replace('vmw:value="efi"', f'vmw:value="{firmware}"')
        return make_ova(work, name, descriptor, [vmdk], manifest=manifest_for([vmdk]))

    def manifest(name: str, disks: list[tuple[Path, str]]) -> Path:
        names = []
        for i, (disk, fmt) in enumerate(disks):
            image = image_of(Disk(disk, "boot"), fmt, tmp / f"{name}-{i}.{SUFFIX[fmt]}")
            names.append(f"machines/boot/{image.name}")
            demo.upload(stack, image, names[-1], bucket=MANUAL_BUCKET)
        path = tmp / f"{name}.machine.json"
        path.write_text(json.dumps({"name": name, "disks": names}))
        return path

    cases = {
        # name: (object, parameters)
        "bios-qcow2": (manifest("bios-qcow2", [(built["bios"], "qcow2"), (data.path, "raw")]), {}),
        "bios-ova": (ova("bios-ova", built["bios"], "bios"), {}),
        "uefi-vhdx": (manifest("uefi-vhdx", [(built["uefi"], "vhdx")]), {}),
        "uefi-ova": (ova("uefi-ova", built["uefi"], "efi"), {}),
        "uefi-not-launched": (manifest("uefi-not-launched", [(built["uefi"], "raw")]), {"launch": False}),
        "unbootable": (manifest("unbootable", [(built["unbootable"], "raw")]), {"target_block": SHORT_CHECK}),
        "unbootable-required": (manifest("unbootable-required", [(built["unbootable"], "qcow2")]),
                                {"target_block": SHORT_CHECK + "-required"}),
    }
    if "vmware" in built:
        cases["vmware-debian"] = (manifest("vmware-debian", [(built["vmware"], "qcow2")]),
                                  {"launch": False, "adapt_guest": "off"})
        # adapted (the default): its update-initramfs cannot run, so the adaptation fails and puts back
        cases["vmware-stub-adapted"] = (manifest("vmware-stub-adapted", [(built["vmware"], "raw")]), {"launch": False})
    # A machine imported first as disks only, then asked for again as a bootable, launched machine
    # (as an operator would after the upload's own import): its boot disk was written to a block volume.
    reimport = manifest("reimport", [(built["bios"], "qcow2"), (data.path, "raw")])
    first_etag, first_run = run_import(stack, reimport, "machines/boot/reimport.machine.json", deployment=MACHINE)
    started = {}

    def start(cases: dict[str, tuple[Path, dict[str, Any]]]) -> None:
        for case, (path, parameters) in cases.items():
            suffix = ".ova" if path.suffix == ".ova" else ".machine.json"
            etag, run = run_import(stack, path, f"machines/boot/{case}{suffix}", deployment=MACHINE, bootable=True,
                                   **parameters)
            started[case] = {"etag": etag, "run": run}

    start(cases)
    if not debian_guests.tools_missing():  # built (or taken from the cache) while the cases above run
        (tmp / "debian-bios").mkdir()
        (tmp / "debian-uefi").mkdir()
        bios = debian_guests.bios_machine(tmp / "debian-bios.raw", tmp / "debian-bios")
        uefi = debian_guests.uefi_lvm_machine(tmp / "debian-uefi.raw", tmp / "debian-uefi")
        start({"debian-bios-off": (manifest("debian-bios-off", [(bios.disk, "qcow2")]),
                                   {"adapt_guest": "off", "target_block": VIRTIO_UNADAPTED}),
               "debian-bios": (manifest("debian-bios", [(bios.disk, "qcow2")]), {}),
               "debian-uefi-lvm-off": (manifest("debian-uefi-lvm-off", [(uefi.disk, "qcow2")]),
                                       {"adapt_guest": "off", "target_block": VIRTIO_UNADAPTED}),
               "debian-uefi-lvm": (manifest("debian-uefi-lvm", [(uefi.disk, "qcow2")]), {})})
    first = demo.wait_for_run(stack, first_run.id, timeout=900)
    started["reimport-first"] = {"etag": first_etag, "run": first_run, "final": first}
    started["reimport"] = {"etag": first_etag, "run": demo.start_import(
        stack, "machines/boot/reimport.machine.json", bucket=MANUAL_BUCKET, etag=first_etag, deployment=MACHINE,
        bootable=True, target_block=NO_CHECK)}
    # Machines whose boot nothing watches (the one that does not boot loops in its firmware): each is
    # stopped as soon as its run has ended, so it takes no more minutes of CPU from the rest of the suite.
    for case in ("unbootable", "reimport", "debian-bios-off", "debian-uefi-lvm-off", "debian-bios", "debian-uefi-lvm"):
        if case not in started:
            continue
        item = started[case]
        item["final"] = demo.wait_for_run(stack, item["run"].id, timeout=900)
        if item["final"].state.is_completed():
            instance_id = demo.run_result(stack, item["final"])["boot"]["instance_id"]
            _, config = demo.stack_clients(stack)
            oci.core.ComputeClient(config, service_endpoint=stack["LOCALOCI_ENDPOINT"]).instance_action(
                instance_id, "STOP")
    for item in started.values():
        if "final" not in item:
            item["final"] = demo.wait_for_run(stack, item["run"].id, timeout=900)
    return {"cases": started, "disks": {**built, "data": data.path}}


def boot_volume(stack, volume_id: str) -> dict[str, Any]:
    return next(v for v in admin(stack, "GET", "inventory")["bootVolumes"] if v["id"] == volume_id)


@pytest.mark.parametrize("case,firmware,source", [("bios-qcow2", "BIOS", "disk"), ("bios-ova", "BIOS", "ovf"),
                                                  ("uefi-vhdx", "UEFI_64", "disk"), ("uefi-ova", "UEFI_64", "ovf")])
def test_a_bootable_machine_is_started_from_its_boot_volume_and_seen_booting(case, firmware, source, boot_imports,
                                                                             stack):
    from tests import boot_disks

    final = boot_imports["cases"][case]["final"]
    assert final.state.is_completed(), f"{case}: {final.state.message}"
    summary = demo.run_result(stack, final)
    started = summary["boot"]
    assert (started["firmware"], started["firmware_source"]) == (firmware, source), started
    checked = started["boot_check"]
    assert checked["booted"], checked
    assert boot_disks.ISSUE_LINE in checked["console_tail"], checked["console_tail"]
    # on its network: an address by DHCP, the launch's key from the instance metadata service, and
    # its SSH banner reached on its private IP
    assert boot_disks.IMDS_LINE + LAUNCH_KEY in checked["console_tail"], checked["console_tail"]
    assert checked["reachable"] and boot_disks.SSH_BANNER in checked["reach_result"], checked
    # the boot volume holds the disk bit-exact, the platform image it came with overwritten
    volume = boot_volume(stack, started["boot_volume_id"])
    disk = boot_imports["disks"][case.split("-")[0]]
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk), volume["backingFile"]],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert volume["freeformTags"]["import-state"] == "imported" and volume["freeformTags"]["import-boot"] == "booted"
    inventory = admin(stack, "GET", "inventory")
    instance = next(i for i in inventory["instances"] if i["id"] == started["instance_id"])
    assert instance["lifecycleState"] == "RUNNING" and instance["launchOptions"]["firmware"] == firmware
    # no Linux root on these disks (a kernel and a busybox initramfs): the guest report cannot tell, virtio is tried
    assert started["guest"]["os_type"] is None and started["boot_volume_type"] == "PARAVIRTUALIZED"
    assert instance["launchOptions"]["bootVolumeType"] == "PARAVIRTUALIZED"
    assert "cannot tell" in started["launch_reason"]
    assert instance["displayName"] == summary["machine"]["name"]
    # every volume in the machine's group; data volumes attached to it in disk order
    group = next(g for g in inventory["volumeGroups"] if g["id"] == summary["volume_group_id"])
    assert group["volumeIds"][0] == started["boot_volume_id"] and len(group["volumeIds"]) == len(summary["disks"])
    attached = sorted((a["device"], a["volumeId"]) for a in inventory["attachments"]
                      if a["instanceId"] == instance["id"])
    assert [v for _, v in attached] == group["volumeIds"][1:]
    # nothing of the import's own is left: no worker VM, no boot volume maker
    assert resources_of(stack, boot_imports["cases"][case]["etag"])["instances"] == []


def test_the_sweeper_leaves_started_machines_and_their_boot_volumes_alone(boot_imports, stack):
    from blocks import OCICredentials
    from diskimport import contract, sweeper

    for item in boot_imports["cases"].values():  # every run has ended (the fixture waited)
        assert item["final"].state.is_final()
    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        clients = OCICredentials.load(local_stack.BLOCKS["credentials"]).clients()
    before = admin(stack, "GET", "inventory")
    removed = sweeper.sweep(clients, stack["COMPARTMENT_ID"], stack["COMPARTMENT_ID"],
                            {contract.TAG_MANAGED_BY: contract.MANAGED_BY}, keep_failed=True)
    after = admin(stack, "GET", "inventory")
    machines = {i["id"] for i in before["instances"] if "imported-machine-of" in i["freeformTags"]}
    assert machines and machines <= {i["id"] for i in after["instances"]}
    assert {v["id"] for v in before["bootVolumes"] if "import-etag" in v["freeformTags"]} <= \
        {v["id"] for v in after["bootVolumes"]}
    assert not set(removed["instances"]) & machines


def test_a_bootable_machine_not_launched_stops_at_a_ready_boot_volume(boot_imports, stack):
    final = boot_imports["cases"]["uefi-not-launched"]["final"]
    assert final.state.is_completed(), final.state.message
    started = demo.run_result(stack, final)["boot"]
    assert started["instance_id"] is None and started["firmware"] == "UEFI_64"
    volume = boot_volume(stack, started["boot_volume_id"])
    assert volume["lifecycleState"] == "AVAILABLE" and volume["freeformTags"]["import-firmware"] == "UEFI_64"
    assert not [a for a in admin(stack, "GET", "inventory")["bootVolumeAttachments"]
                if a["bootVolumeId"] == volume["id"]]


def test_a_disk_without_a_bootloader_is_reported_as_not_booting_with_its_console(boot_imports, stack):
    final = boot_imports["cases"]["unbootable"]["final"]
    assert final.state.is_completed(), final.state.message  # boot_check: warn
    started = demo.run_result(stack, final)["boot"]
    assert started["firmware_source"] == "default" and "without boot code" in started["firmware_reason"]
    checked = started["boot_check"]
    assert not checked["booted"] and any("Booting from Hard Disk" in line for line in checked["console_tail"]), checked
    assert boot_volume(stack, started["boot_volume_id"])["freeformTags"]["import-boot"] == "not-booted"


def test_a_machine_that_must_boot_and_does_not_fails_stopped_with_its_volumes_kept(boot_imports, stack):
    item = boot_imports["cases"]["unbootable-required"]
    state = item["final"].state
    assert state.is_failed() and "machine-did-not-boot" in (state.message or ""), state.message
    inventory = admin(stack, "GET", "inventory")
    [instance] = [i for i in inventory["instances"] if i["displayName"] == "unbootable-required"]
    assert instance["lifecycleState"] == "STOPPED"
    [kept] = [v for v in inventory["bootVolumes"] if v["freeformTags"].get("import-etag") == item["etag"]]
    assert kept["freeformTags"]["import-boot"] == "not-booted" and kept["freeformTags"]["import-state"] == "imported"


def test_a_linux_guest_from_vmware_is_inspected_and_would_launch_emulated(boot_imports, stack):
    """The guest report of a Debian guest shaped as it leaves VMware (tests/linux_guests.py): no
    virtio in its initramfs, so the launch options chosen are an IDE boot volume and an E1000 card."""
    if "vmware-debian" not in boot_imports["cases"]:
        pytest.skip(f"guest building tools missing: {linux_guests.tools_missing()}")
    item = boot_imports["cases"]["vmware-debian"]
    final = item["final"]
    assert final.state.is_completed(), final.state.message
    started = demo.run_result(stack, final)["boot"]
    assert (started["boot_volume_type"], started["network_type"]) == ("IDE", "E1000"), started["launch_reason"]
    assert "boots emulated only" in started["launch_reason"] and "lacks virtio_pci" in started["launch_reason"]
    guest = started["guest"]
    assert guest["name"] == "Debian GNU/Linux 12 (bookworm)" and guest["root"] == "p2"
    assert guest["kernels"][0]["initramfs_drivers"] == ["ata_piix", "sd_mod", "vmw_pvscsi"]
    verdicts = {v["mode"]: (v["boots"], v["reachable"]) for v in guest["verdicts"]}
    assert verdicts == {"PARAVIRTUALIZED": (False, False), "EMULATED": (True, False)}
    assert "| PARAVIRTUALIZED | **no** | **no** |" in guest_report_artifact(stack, item["run"].id)


def guest_report_artifact(stack, run_id) -> str:
    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["guest-report"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return str(artifact.data)


def debian_case(boot_imports, case: str) -> dict[str, Any]:
    if case not in boot_imports["cases"]:
        pytest.skip(f"guest building tools missing: {debian_guests.tools_missing()}")
    return boot_imports["cases"][case]


@pytest.mark.parametrize("case,firmware", [("debian-bios-off", "BIOS"), ("debian-uefi-lvm-off", "UEFI_64")])
def test_a_debian_machine_from_vmware_launched_on_virtio_unadapted_does_not_come_up(case, firmware, boot_imports,
                                                                                     stack):
    """adapt_guest off, virtio asked for by the block: GRUB starts the kernel, whose initramfs has
    no virtio driver; nothing reaches the serial console (the guest's console is tty0)."""
    item = debian_case(boot_imports, case)
    assert item["final"].state.is_completed(), item["final"].state.message  # boot_check: warn
    started = demo.run_result(stack, item["final"])["boot"]
    assert started["firmware"] == firmware
    assert (started["boot_volume_type"], started["network_type"]) == ("PARAVIRTUALIZED", "PARAVIRTUALIZED")
    assert started["launch_reason"].startswith("set in the TargetMachine block")
    checked = started["boot_check"]
    assert not checked["booted"], checked
    tail = "\n".join(checked["console_tail"])
    assert "Booting `Debian GNU/Linux'" in tail and debian_guests.LOGIN_PROMPT not in tail, tail
    guest = started["guest"]
    assert {v["mode"]: (v["boots"], v["reachable"]) for v in guest["verdicts"]}["PARAVIRTUALIZED"] == (False, False)
    assert guest["adaptation"]["mode"] == "off" and not guest["adaptation"]["ran"]
    assert "Guest adaptation: off" in guest_report_artifact(stack, item["run"].id)


@pytest.mark.parametrize("case,firmware", [("debian-bios", "BIOS"), ("debian-uefi-lvm", "UEFI_64")])
def test_a_debian_machine_from_vmware_once_adapted_boots_on_virtio_to_a_login_prompt_and_answers_ssh(
        case, firmware, boot_imports, stack):
    """The guest adapted on the worker with its own update-initramfs, then launched on virtio (as
    the report after the adaptation says it boots): its systemd's login prompt on the serial
    console, its own sshd answering on its private IP by DHCP."""
    item = debian_case(boot_imports, case)
    assert item["final"].state.is_completed(), item["final"].state.message
    started = demo.run_result(stack, item["final"])["boot"]
    assert started["firmware"] == firmware
    assert (started["boot_volume_type"], started["network_type"]) == ("PARAVIRTUALIZED", "PARAVIRTUALIZED")
    assert started["launch_reason"] == "the guest has the virtio drivers"
    checked = started["boot_check"]
    assert checked["booted"] and debian_guests.LOGIN_PROMPT in "\n".join(checked["console_tail"]), checked
    assert checked["reachable"] and "SSH-2.0-OpenSSH" in checked["reach_result"], checked
    guest = started["guest"]
    assert {v["mode"]: (v["boots"], v["reachable"]) for v in guest["verdicts"]}["PARAVIRTUALIZED"] == (True, True)
    done = guest["adaptation"]
    assert done["ran"] and done["ok"] and done["restored"] is None
    changed = {c["path"]: c["action"] for c in done["changes"]}
    assert changed[f"/boot/initrd.img-{guest['default_kernel']}"] == "rebuilt"
    assert {"/etc/fstab", "/etc/network/interfaces", "/etc/default/grub"} <= set(changed)
    assert "| `/etc/fstab` | changed |" in guest_report_artifact(stack, item["run"].id)


def test_an_adaptation_that_fails_fails_the_run_with_its_code_and_keeps_the_volumes_as_written(boot_imports, stack):
    """The stub guest's update-initramfs cannot run: what the adaptation changed is put back, the
    run fails with guest-adaptation-failed, the boot volume is kept (tagged failed) for inspection."""
    if "vmware-stub-adapted" not in boot_imports["cases"]:
        pytest.skip(f"guest building tools missing: {linux_guests.tools_missing()}")
    item = boot_imports["cases"]["vmware-stub-adapted"]
    state = item["final"].state
    assert state.is_failed() and "guest-adaptation-failed" in (state.message or ""), state.message
    assert "everything it changed was put back" in state.message
    [kept] = [v for v in admin(stack, "GET", "inventory")["bootVolumes"]
              if v["freeformTags"].get("import-etag") == item["etag"]]
    assert kept["lifecycleState"] == "AVAILABLE" and kept["freeformTags"]["import-state"] == "failed"
    text = guest_report_artifact(stack, item["run"].id)
    assert "Guest adaptation **failed**" in text and "update-initramfs" in text


def test_a_machine_imported_as_disks_then_asked_for_bootable_gets_a_boot_volume_and_keeps_its_data_volume(
        boot_imports, stack):
    """The boot disk's block volume cannot be launched from: the bootable run writes the boot disk
    again onto a boot volume, reuses the data disk's volume and moves the group to the new pair."""
    first, again = boot_imports["cases"]["reimport-first"]["final"], boot_imports["cases"]["reimport"]["final"]
    assert first.state.is_completed() and again.state.is_completed(), again.state.message
    before, after = demo.run_result(stack, first), demo.run_result(stack, again)
    assert before["boot"] is None and after["boot"]["instance_id"]
    assert after["boot"]["boot_volume_id"].startswith("ocid1.bootvolume.")
    assert [d["reused"] for d in after["disks"]] == [False, True]
    assert after["disks"][1]["volume_id"] == before["disks"][1]["volume_id"]
    assert after["volume_group_id"] == before["volume_group_id"]
    group = next(g for g in admin(stack, "GET", "inventory")["volumeGroups"] if g["id"] == after["volume_group_id"])
    assert group["volumeIds"] == [after["boot"]["boot_volume_id"], before["disks"][1]["volume_id"]]
    volume = boot_volume(stack, after["boot"]["boot_volume_id"])
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(boot_imports["disks"]["bios"]),
                               volume["backingFile"]], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
