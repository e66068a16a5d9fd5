"""The benchmark's images, generated once and kept under ``.local/bench/images``.

Each is a partitioned disk (GPT: a small ext4 holding files, then a data partition)
whose data is incompressible (``os.urandom``) and spread over the whole virtual disk,
so neither compression nor a contiguous layout flatters any pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from diskimport.agent.decompress import DECOMPRESSORS as AGENT_DECOMPRESSORS

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 64 * MiB
VERSION = 1  # bump when the generator changes, so cached images are made again


@dataclass(frozen=True)
class ImageSpec:
    name: str
    fmt: str            # qemu-img format of the uploaded object
    suffix: str         # object name suffix
    virtual_size: int
    data_bytes: int     # incompressible bytes written into the disk
    partitioned: bool = True
    options: str | None = None  # qemu-img -o for the output format
    compression: str | None = None  # "zstd" or "gzip": the image file compressed (``suffix`` ends .zst/.gz)

    @property
    def metadata(self) -> dict[str, str]:
        """The upload's metadata: a gzip over 4 GiB records no usable size, so the uploader states it."""
        return {"virtual-size": str(self.virtual_size)} if self.compression == "gzip" else {}


SPECS = (
    ImageSpec("qcow2-8g", "qcow2", "qcow2", 8 * GiB, 4 * GiB),
    ImageSpec("vmdk-64g-sparse", "vmdk", "vmdk", 64 * GiB, 1 * GiB, options="subformat=streamOptimized"),
    ImageSpec("raw-1g-dense", "raw", "raw", 1 * GiB, 1 * GiB, partitioned=False),
    ImageSpec("small-50m", "qcow2", "qcow2", 128 * MiB, 48 * MiB),
    ImageSpec("raw-8g-zst", "raw", "raw.zst", 8 * GiB, 4 * GiB, compression="zstd"),
    ImageSpec("raw-8g-gz", "raw", "raw.gz", 8 * GiB, 4 * GiB, compression="gzip"),
)
# How each compression is made: from a file, so zstd records the content size.
COMPRESSORS = {"zstd": ["zstd", "-q", "-1", "-T0", "-c"], "gzip": ["gzip", "-1", "-c"]}
DECOMPRESSORS = {name: AGENT_DECOMPRESSORS[name] for name in COMPRESSORS}  # the agent's own commands

EXT4_OFFSET = MiB
EXT4_SIZE = 16 * MiB


def _run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def _spread(start: int, end: int, data_bytes: int, block: int) -> list[int]:
    """Offsets of ``data_bytes / block`` blocks spread evenly over [start, end)."""
    count = max(1, data_bytes // block)
    span = (end - start) // block  # whole blocks that fit
    if count > span:
        raise ValueError(f"{data_bytes} bytes of data do not fit in {end - start} bytes")
    return [start + (i * span // count) * block for i in range(count)]


def build_raw(spec: ImageSpec, path: Path) -> None:
    """The raw disk behind ``spec``: partition table, a checked ext4, incompressible data."""
    with open(path, "wb") as f:
        f.truncate(spec.virtual_size)
    if not spec.partitioned:
        with open(path, "r+b") as f:
            for offset in range(0, spec.data_bytes, BLOCK):
                f.seek(offset)
                f.write(os.urandom(min(BLOCK, spec.data_bytes - offset)))
        return
    data_start = EXT4_OFFSET + EXT4_SIZE
    data_end = spec.virtual_size - MiB  # the backup GPT lives in the last MiB
    _run("sfdisk", "--quiet", str(path), stdin=(
        "label: gpt\n"
        f"start={EXT4_OFFSET // 512}, size={EXT4_SIZE // 512}, type=L\n"
        f"start={data_start // 512}, size={(data_end - data_start) // 512}, type=L\n"))
    tree = path.with_suffix(".tree")
    tree.mkdir(exist_ok=True)
    (tree / "README.txt").write_text(f"benchmark image {spec.name}\n")
    (tree / "random.bin").write_bytes(os.urandom(4 * MiB))
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={EXT4_OFFSET}", "-d", str(tree), str(path),
         f"{EXT4_SIZE // 1024}k")
    for item in tree.iterdir():
        item.unlink()
    tree.rmdir()
    block = min(BLOCK, spec.data_bytes)
    with open(path, "r+b") as f:
        for offset in _spread(data_start, data_end, spec.data_bytes, block):
            f.seek(offset)
            f.write(os.urandom(block))


def ensure_image(spec: ImageSpec, directory: Path) -> Path:
    """The image file for ``spec``, made now unless an identical one is cached."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{spec.name}.{spec.suffix}"
    stamp = directory / f"{spec.name}.json"
    wanted = {"version": VERSION, **asdict(spec)}
    if target.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return target
    stamp.unlink(missing_ok=True)
    raw = directory / f"{spec.name}.raw-source"
    try:
        build_raw(spec, raw)
        if spec.compression:
            source = raw
            if spec.fmt != "raw":
                source = directory / f"{spec.name}.{spec.fmt}-source"
                _run("qemu-img", "convert", "-f", "raw", "-O", spec.fmt, str(raw), str(source))
            try:
                with open(target, "wb") as out:
                    subprocess.run([*COMPRESSORS[spec.compression], str(source)], stdout=out, check=True)
            finally:
                if source != raw:
                    source.unlink(missing_ok=True)
        elif spec.fmt == "raw":
            raw.rename(target)
        else:
            argv = ["qemu-img", "convert", "-f", "raw", "-O", spec.fmt]
            if spec.options:
                argv += ["-o", spec.options]
            _run(*argv, str(raw), str(target))
    finally:
        raw.unlink(missing_ok=True)
    stamp.write_text(json.dumps(wanted))
    return target


# -- the machine: three streamOptimized disks in an OVA, as an exporter writes it ---------------

MACHINE = "machine-3-disks"
MACHINE_DISKS = (
    ImageSpec("machine-disk1", "vmdk", "vmdk", 8 * GiB, 4 * GiB, options="subformat=streamOptimized"),
    ImageSpec("machine-disk2", "vmdk", "vmdk", 4 * GiB, 2 * GiB, options="subformat=streamOptimized"),
    ImageSpec("machine-disk3", "vmdk", "vmdk", 2 * GiB, 1 * GiB, options="subformat=streamOptimized"),
)
OVF_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
{files}
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{disks}
  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item>
        <rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>8192</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType>
      </Item>
{items}
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"


def ensure_machine(directory: Path) -> tuple[Path, list[Path]]:
    """The OVA of :data:`MACHINE_DISKS` (descriptor, SHA256 manifest, disks) and the disks themselves."""
    import hashlib
    import tarfile

    disks = [ensure_image(spec, directory) for spec in MACHINE_DISKS]
    ova = directory / f"{MACHINE}.ova"
    stamp = directory / f"{MACHINE}.json"
    wanted = {"version": VERSION, "disks": [[p.name, p.stat().st_size, p.stat().st_mtime] for p in disks]}
    if ova.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return ova, disks
    stamp.unlink(missing_ok=True)
    descriptor = OVF_TEMPLATE.format(
        name=MACHINE,
        files="\n".join(f'    <File ovf:href="{p.name}" ovf:id="file{i}" ovf:size="{p.stat().st_size}"/>'
                        for i, p in enumerate(disks, 1)),
        disks="\n".join(f'    <Disk ovf:capacity="{s.virtual_size}" ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" '
                        f'ovf:format="{STREAM_OPTIMIZED}"/>' for i, s in enumerate(MACHINE_DISKS, 1)),
        items="\n".join(f"      <Item><rasd:AddressOnParent>{i - 1}</rasd:AddressOnParent>"
                        f"<rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource><rasd:InstanceID>{10 + i}"
                        f"</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType>"
                        f"</Item>" for i in range(1, len(disks) + 1))).encode()
    ovf = directory / f"{MACHINE}.ovf"
    ovf.write_bytes(descriptor)
    lines = [f"SHA256({ovf.name})= {hashlib.sha256(descriptor).hexdigest()}"]
    for path in disks:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(8 * MiB), b""):
                digest.update(block)
        lines.append(f"SHA256({path.name})= {digest.hexdigest()}")
    manifest = directory / f"{MACHINE}.mf"
    manifest.write_text("\n".join(lines) + "\n")
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:  # the descriptor first, as OVF asks
        for member in (ovf, manifest, *disks):
            tar.add(str(member), arcname=member.name)
    stamp.write_text(json.dumps(wanted))
    return ova, disks
