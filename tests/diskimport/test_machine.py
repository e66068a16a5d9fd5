"""Whole machines described by an OVA, an OVF with its disks beside it, or a machine manifest:
read from headers and small ranged reads, checked before anything is created.

The OVAs are real tars of streamOptimized VMDKs made by qemu-img, with descriptors written as
VMware's ovftool (OVF 1.x) and VirtualBox (OVF 2.0) write them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any, Callable

import pytest

from diskimport.images import machine
from diskimport.errors import ImageRejected

from . import test_hostile_images as hostile

MiB = 1024 * 1024
DATA = Path(__file__).with_name("data")

VMWARE_OVF = (DATA / "vmware-ovftool.ovf.template").read_text()  # as that tool writes it; {files}, {disks}, {items} filled in

VIRTUALBOX_OVF = (DATA / "virtualbox.ovf.template").read_text()  # as that tool writes it; {files}, {disks}, {items} filled in


def vmdk_disk(tmp: Path, name: str, size_mib: int, fill: bytes) -> Path:
    raw = tmp / f"{name}.raw"
    with open(raw, "wb") as f:
        f.truncate(size_mib * MiB)
        f.seek(MiB)
        f.write(fill * (64 * 1024))
    target = tmp / f"{name}.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(target)], check=True, capture_output=True)
    raw.unlink()
    return target


def vmware_descriptor(disks: list[tuple[Path, int]], **overrides: str) -> str:
    """ovftool's layout: disk items listed out of address order; the third disk on SATA."""
    files = "\n".join(f'    <File ovf:href="{path.name}" ovf:id="file{i + 1}" ovf:size="{path.stat().st_size}"/>'
                      for i, (path, _) in enumerate(disks))
    capacities = "\n".join(
        f'    <Disk ovf:capacity="{size_mib}" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk{i + 1}" '
        f'ovf:fileRef="file{i + 1}" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html'
        f'#streamOptimized" ovf:populatedSize="{MiB}"/>' for i, (_, size_mib) in enumerate(disks))
    placement = {0: ("3", 0), 1: ("3", 1), 2: ("4", 0)}
    items = []
    for i in (1, 0, 2)[:len(disks)]:
        parent, address = placement[i]
        items.append(f"""      <Item>
        <rasd:AddressOnParent>{address}</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk {i + 1}</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk{i + 1}</rasd:HostResource>
        <rasd:InstanceID>{10 + i}</rasd:InstanceID>
        <rasd:Parent>{parent}</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>""")
    text = VMWARE_OVF.format(files=files, disks=capacities, items="\n".join(items))
    for old, new in overrides.items():
        text = text.replace(old, new)
    return text


def virtualbox_descriptor(disks: list[tuple[Path, int]]) -> str:
    files = "\n".join(f'    <File ovf:id="file{i + 1}" ovf:href="{path.name}"/>' for i, (path, _) in enumerate(disks))
    capacities = "\n".join(
        f'    <Disk ovf:capacity="{size_mib * MiB}" ovf:diskId="vmdisk{i + 1}" ovf:fileRef="file{i + 1}" '
        'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" '
        'vbox:uuid="00000000-0000-4000-8000-00000000000{i}"/>' for i, (_, size_mib) in enumerate(disks))
    items = "\n".join(f"""      <StorageItem>
        <sasd:AddressOnParent>{i}</sasd:AddressOnParent>
        <sasd:Caption>disk{i + 1}</sasd:Caption>
        <sasd:HostResource>/disk/vmdisk{i + 1}</sasd:HostResource>
        <sasd:InstanceID>{10 + i}</sasd:InstanceID>
        <sasd:Parent>3</sasd:Parent>
        <sasd:ResourceType>17</sasd:ResourceType>
      </StorageItem>""" for i in range(len(disks)))
    return VIRTUALBOX_OVF.format(files=files, disks=capacities, items=items)


def manifest_for(paths: list[Path], algorithm: str = "SHA256", spaced: bool = False) -> str:
    line = "{a} ({n}) = {d}\n" if spaced else "{a}({n})= {d}\n"
    return "".join(line.format(a=algorithm, n=p.name, d=hashlib.new(algorithm.lower(), p.read_bytes()).hexdigest())
                   for p in paths)


def make_ova(tmp: Path, name: str, descriptor: str, disks: list[Path], manifest: str | None = None,
             extra: list[Path] = ()) -> Path:
    ovf = tmp / f"{name}.ovf"
    ovf.write_text(descriptor)
    members = [ovf]
    if manifest is not None:
        mf = tmp / f"{name}.mf"
        mf.write_text(manifest.replace("__OVF__", hashlib.sha256(ovf.read_bytes()).hexdigest()))
        members.append(mf)
    members += [*disks, *extra]
    ova = tmp / f"{name}.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:  # the descriptor first, as OVF asks
        for member in members:
            tar.add(str(member), arcname=member.name)
    return ova


class Reads:
    """Serves ranged reads of a file, counting the bytes, as Object Storage would."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.bytes = 0
        self.requests = 0

    def __call__(self, start: int, end: int) -> bytes | None:
        self.requests += 1
        piece = self.data[start:end]
        self.bytes += len(piece)
        return piece


@pytest.fixture(scope="module")
def three_disks(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, int]]:
    tmp = tmp_path_factory.mktemp("vmdks")
    return [(vmdk_disk(tmp, f"web-01-disk{i + 1}", size, bytes([i + 1])), size)
            for i, size in enumerate((24, 16, 8))]


def test_a_vmware_ova_is_read_from_its_headers_with_disks_in_boot_order(three_disks, tmp_path):
    paths = [p for p, _ in three_disks]
    ova = make_ova(tmp_path, "web-01", vmware_descriptor(three_disks),
                   paths, manifest="SHA256(web-01.ovf)= __OVF__\n" + manifest_for(paths))
    reads = Reads(ova)
    found = machine.describe_ova(reads, ova.stat().st_size, "exports/web-01.ova")
    assert (found.name, found.source, found.firmware, found.cpus, found.memory_mb, found.os) == \
        ("web-01", "ova", "UEFI_64", 2, 4096, "rhel8_64Guest")
    # SCSI 0:0, SCSI 0:1, then the SATA controller's disk, whatever order the items are listed in
    assert [d.name for d in found.disks] == ["vmdisk1", "vmdisk2", "vmdisk3"]
    assert [d.position for d in found.disks] == [0, 1, 2]
    with tarfile.open(ova) as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    for disk, (path, size_mib) in zip(found.disks, three_disks):
        assert (disk.file, disk.capacity, disk.format) == (path.name, size_mib * MiB, "vmdk")
        assert (disk.offset, disk.size) == members[path.name]
        assert disk.digest == ("sha256", hashlib.sha256(path.read_bytes()).hexdigest())
        assert reads.data[disk.offset:disk.offset + disk.size] == path.read_bytes()
    # headers, the descriptor and the manifest: nothing of the disks was read
    assert reads.bytes < 32 * 1024 and reads.requests <= 12


def test_a_virtualbox_ovf_2_ova_with_a_sha1_manifest(three_disks, tmp_path):
    paths = [p for p, _ in three_disks[:2]]
    ova = make_ova(tmp_path, "fedora", virtualbox_descriptor(three_disks[:2]), paths,
                   manifest=manifest_for(paths, "SHA1", spaced=True))
    found = machine.describe_ova(Reads(ova), ova.stat().st_size, "fedora.ova")
    assert (found.name, found.firmware, found.cpus, found.memory_mb) == ("Fedora-Workstation", "UEFI_64", 4, 2048)
    assert [(d.file, d.capacity) for d in found.disks] == [(p.name, s * MiB) for p, s in three_disks[:2]]
    assert found.disks[1].digest == ("sha1", hashlib.sha1(paths[1].read_bytes()).hexdigest())


def test_an_ova_without_a_manifest_has_no_digests_to_check(three_disks, tmp_path):
    ova = make_ova(tmp_path, "plain", vmware_descriptor(three_disks[:1]), [three_disks[0][0]])
    found = machine.describe_ova(Reads(ova), ova.stat().st_size, "plain.ova")
    assert [d.digest for d in found.disks] == [None]


REFUSALS: dict[str, tuple[Callable[[list[tuple[Path, int]], Path], Path], str, str]] = {
    "descriptor digest": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:1]), [d[0][0]],
                                                manifest="SHA256(vm.ovf)= " + "0" * 64 + "\n"),
                          "ova-digest-mismatch", "'vm.ovf' does not match its SHA256"),
    "missing disk file": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:2]), [d[0][0]]),
                          "ova-missing-file", "'web-01-disk2.vmdk'"),
    "member size": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:1]).replace(
                        f'ovf:size="{d[0][0].stat().st_size}"', 'ovf:size="12345"'), [d[0][0]]),
                    "ova-size-mismatch", "'web-01-disk1.vmdk' is"),
    "document type": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:1]).replace(
                          '<?xml version="1.0" encoding="UTF-8"?>',
                          '<?xml version="1.0"?><!DOCTYPE Envelope [<!ENTITY a "aaaa">]>'), [d[0][0]]),
                      "ovf-invalid", "document type"),
    "chunked file": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:1]).replace(
                         'ovf:id="file1"', 'ovf:id="file1" ovf:chunkSize="1048576"'), [d[0][0]]),
                     "ovf-unsupported", "'web-01-disk1.vmdk' is split into chunks"),
    "escaping href": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:1]).replace(
                          'ovf:href="web-01-disk1.vmdk"', 'ovf:href="../../etc/shadow"'), [d[0][0]]),
                      "ovf-invalid", "'../../etc/shadow'"),
    "two descriptors": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:1]), [d[0][0]],
                                              extra=[_file(t / "other.ovf", "<Envelope/>")]),
                        "ova-malformed", "one OVF descriptor is expected"),
    "manifest lists a stranger": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:1]), [d[0][0]],
                                                        manifest="SHA256(ghost.vmdk)= " + "a" * 64 + "\n"),
                                  "ova-manifest-invalid", "'ghost.vmdk'"),
    "not a manifest": (lambda d, t: make_ova(t, "vm", vmware_descriptor(d[:1]), [d[0][0]],
                                             manifest="MD5(web-01-disk1.vmdk)= abc\n"),
                       "ova-manifest-invalid", "line 1"),
    "not xml": (lambda d, t: make_ova(t, "vm", "<Envelope", [d[0][0]]), "ovf-invalid", "not well-formed"),
}


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(REFUSALS))
def test_an_ova_that_does_not_hold_together_is_refused_naming_what(case, three_disks, tmp_path):
    build, code, named = REFUSALS[case]
    ova = build(three_disks, tmp_path)
    with pytest.raises(ImageRejected) as refused:
        machine.describe_ova(Reads(ova), ova.stat().st_size, "vm.ova")
    assert refused.value.code == code and named in str(refused.value), str(refused.value)


def test_an_ova_with_a_link_is_refused(three_disks, tmp_path):
    ova = make_ova(tmp_path, "vm", vmware_descriptor(three_disks[:1]), [three_disks[0][0]])
    with tarfile.open(ova, "a") as tar:
        link = tarfile.TarInfo("sneaky.vmdk")
        link.type, link.linkname = tarfile.SYMTYPE, "/dev/sda"
        tar.addfile(link)
    with pytest.raises(ImageRejected, match="^ova-malformed: the OVA holds a symbolic link"):
        machine.describe_ova(Reads(ova), ova.stat().st_size, "vm.ova")


def test_an_ovf_finds_its_disks_beside_it_in_the_bucket(three_disks, tmp_path):
    descriptor = vmware_descriptor(three_disks[:2]).encode()
    paths = [p for p, _ in three_disks[:2]]
    manifest = (f"SHA256(web-01.ovf)= {hashlib.sha256(descriptor).hexdigest()}\n" + manifest_for(paths)).encode()
    sizes = {f"vms/web/{p.name}": p.stat().st_size for p in paths}
    found = machine.describe_ovf(descriptor, "vms/web/web-01.ovf", manifest, sizes)
    assert [(d.file, d.size) for d in found.disks] == [(f"vms/web/{p.name}", p.stat().st_size) for p in paths]
    assert found.disks[0].digest[0] == "sha256" and found.source == "ovf"
    assert machine.ovf_companions("vms/web/web-01.ovf") == ("vms/web/", "vms/web/web-01.mf")
    with pytest.raises(ImageRejected, match="^ova-missing-file: .*no object 'vms/web/web-01-disk2.vmdk'"):
        machine.describe_ovf(descriptor, "vms/web/web-01.ovf", None, {f"vms/web/{paths[0].name}": paths[0].stat().st_size})


def test_a_machine_manifest_names_its_disks_in_order():
    found = machine.parse_machine_manifest(json.dumps({
        "disks": ["exports/db-boot.qcow2", "exports/db-data.raw.zst"], "firmware": "UEFI_64",
        "shape": "VM.Standard.E5.Flex", "ocpus": 2, "memory_gbs": 16}).encode(), "exports/db-01.machine.json")
    assert (found.name, found.firmware, found.shape, found.cpus, found.memory_mb) == \
        ("db-01", "UEFI_64", "VM.Standard.E5.Flex", 2, 16384)
    assert [(d.position, d.file) for d in found.disks] == [(0, "exports/db-boot.qcow2"), (1, "exports/db-data.raw.zst")]


def test_a_machine_manifests_launch_options_win_over_the_guest_report_and_the_block():
    from diskimport.guest.report import report_from
    from diskimport.machine_import import launch_types

    found = machine.parse_machine_manifest(json.dumps({
        "disks": ["web-boot.vmdk"], "boot_volume_type": "IDE", "network_type": "E1000"}).encode(), "web.machine.json")
    assert found.hints == {"boot_volume_type": "IDE", "network_type": "E1000"}
    unknown = report_from({"os": {"type": None, "reason": "no root"}})  # the report cannot tell: virtio by itself
    assert launch_types(unknown, "auto", "auto")[:2] == ("PARAVIRTUALIZED", "PARAVIRTUALIZED")
    chosen = launch_types(unknown, found.hints["boot_volume_type"], found.hints["network_type"], "the machine manifest")
    assert chosen[:2] == ("IDE", "E1000") and chosen[2].startswith("set in the machine manifest")


@pytest.mark.parametrize("doc,named", [
    ({"disks": ["a.qcow2"], "disk": []}, "unknown field 'disk'"),
    ({"disks": []}, "disks must be a list"),
    ({"disks": "a.qcow2"}, "disks must be a list"),
    ({"disks": ["a.qcow2", "notes.txt"]}, "disks[1] 'notes.txt' is not an image name"),
    ({"disks": ["a.qcow2", "a.qcow2"]}, "disks[1] 'a.qcow2' is listed twice"),
    ({"disks": ["a.qcow2", 7]}, "disks[1] must be an object name"),
    ({"disks": ["a.qcow2"], "firmware": "efi"}, "firmware 'efi'"),
    ({"disks": ["a.qcow2"], "name": "../etc"}, "name '../etc'"),
    ({"disks": ["a.qcow2"], "ocpus": 0}, "ocpus must be a number above 0"),
    ({"disks": ["a.qcow2"], "memory_gbs": True}, "memory_gbs must be a number above 0"),
    ({"disks": [f"d{i}.raw" for i in range(33)]}, "at most 32"),
    ({"disks": ["a.qcow2"], "boot_volume_type": "virtio"}, "boot_volume_type 'virtio' must be one of"),
    ({"disks": ["a.qcow2"], "network_type": "e1000"}, "network_type 'e1000' must be one of"),
    ([], "not a JSON object"),
])
def test_a_machine_manifest_that_is_wrong_is_refused_naming_the_field(doc: Any, named: str):
    with pytest.raises(ImageRejected) as refused:
        machine.parse_machine_manifest(json.dumps(doc).encode(), "m.machine.json")
    assert refused.value.code == "machine-manifest-invalid" and named in str(refused.value), str(refused.value)


def test_a_machine_manifest_that_is_not_json_is_refused():
    with pytest.raises(ImageRejected, match="^machine-manifest-invalid: the manifest is not JSON"):
        machine.parse_machine_manifest(b"{disks: [", "m.machine.json")


def test_every_disk_of_an_ova_is_inspected_from_its_head_and_tail_and_sized(three_disks, tmp_path):
    ova = make_ova(tmp_path, "web-01", vmware_descriptor(three_disks), [p for p, _ in three_disks])
    reads = Reads(ova)
    found = machine.describe_ova(reads, ova.stat().st_size, "web-01.ova")
    inspected = machine.inspect_ova_disks(found, reads, 1 << 40)
    assert [(image.format, image.virtual_size) for _, image, _ in inspected] == \
        [("vmdk", size * MiB) for _, size in three_disks]
    assert [(packed.container, packed.inner_offset, packed.inner_size) for _, _, packed in inspected] == \
        [("tar", d.offset, d.size) for d in found.disks]
    assert reads.bytes < 3 * 4 * MiB  # heads and tails, not the disks


def test_a_disk_larger_than_the_descriptor_says_is_refused_naming_it(three_disks, tmp_path):
    descriptor = vmware_descriptor(three_disks[:2]).replace('ovf:capacity="16"', 'ovf:capacity="15"')
    ova = make_ova(tmp_path, "vm", descriptor, [p for p, _ in three_disks[:2]])
    reads = Reads(ova)
    with pytest.raises(ImageRejected, match=r"^ova-capacity-mismatch: disk 2 \(web-01-disk2.vmdk\): the descriptor "
                                            r"says 15728640 bytes, the header 16777216"):
        machine.inspect_ova_disks(machine.describe_ova(reads, ova.stat().st_size, "vm.ova"), reads, 1 << 40)


SUFFIX = {"qcow2": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx", "vpc": "vhd", "vdi": "vdi", "raw": "raw"}


@pytest.mark.parametrize("case", list(hostile.CORPUS))
def test_a_hostile_disk_inside_an_ova_is_refused_with_its_code_naming_the_disk(case, three_disks, tmp_path):
    build, code = hostile.CORPUS[case]
    work = tmp_path / "hostile"
    work.mkdir()
    path, claimed = build(work)
    if claimed:  # the member's name claims what the plain upload claimed; the descriptor claims nothing
        path = path.rename(work / f"disk2.{SUFFIX[claimed]}")
    disks = [three_disks[0], (path, 64)]
    descriptor = vmware_descriptor(disks).replace(
        'ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"',
        'ovf:fileRef="file2"')
    ova = make_ova(tmp_path, "vm", descriptor, [d for d, _ in disks])
    reads = Reads(ova)
    with pytest.raises(ImageRejected) as refused:
        machine.inspect_ova_disks(machine.describe_ova(reads, ova.stat().st_size, "vm.ova"), reads, 32 * 1024**4)
    assert refused.value.code == code and f"disk 2 ({path.name}): " in str(refused.value), str(refused.value)
