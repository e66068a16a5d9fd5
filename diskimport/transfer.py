"""What runs on the worker: tools, staging the object, second-opinion inspection,
the write and its verification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .commands import CommandFailed, CommandRunner
from .inspection import ImageRejected
from .qemu_img import CHECKABLE_FORMATS, ImageInfo, QemuImg


class VerificationFailed(Exception):
    """The volume does not read back as the image's guest-visible content."""


def ensure_tools(runner: CommandRunner) -> str:
    """Make sure qemu-img and the filesystem checkers are on the worker; return qemu-img's version.

    Installs them with the worker's package manager when missing (dnf/yum on Oracle Linux,
    apt-get on Debian/Ubuntu).
    """
    needed = ["qemu-img", "curl", "e2fsck", "xfs_repair", "fsck.vfat", "sfdisk", "blkid", "losetup", "prlimit"]
    probe = runner.run(["sh", "-c", 'for t in "$@"; do command -v "$t" >/dev/null || echo "$t"; done', "sh", *needed])
    missing = probe.stdout.split()
    if missing:
        install = ["sh", "-c",
                   "if command -v dnf >/dev/null; then dnf -y -q install qemu-img curl e2fsprogs xfsprogs dosfstools "
                   "util-linux; elif command -v yum >/dev/null; then yum -y -q install qemu-img curl e2fsprogs "
                   "xfsprogs dosfstools util-linux; else DEBIAN_FRONTEND=noninteractive apt-get -qq update && "
                   "DEBIAN_FRONTEND=noninteractive apt-get -qq install -y qemu-utils curl e2fsprogs xfsprogs "
                   "dosfstools fdisk util-linux; fi"]
        result = runner.run(install, timeout=900)
        if result.returncode != 0:
            raise CommandFailed(result, f"installing {' '.join(missing)} on the worker")
    return QemuImg(runner).version()


@dataclass(frozen=True)
class StagedImage:
    directory: str
    path: str
    size: int


def make_staging_dir(runner: CommandRunner, import_id: str) -> str:
    result = runner.run(["mktemp", "-d", f"/var/tmp/oci-disk-import.{import_id[:16]}.XXXXXX"])
    if result.returncode != 0:
        raise CommandFailed(result, "mktemp")
    return result.stdout.strip()


def stage_object(runner: CommandRunner, put_private_file: Callable[[str, str], None], url: str, directory: str,
                 expected_size: int) -> StagedImage:
    """Download the object through its PAR URL onto the worker's disk.

    The URL (a bearer secret) goes into a curl config file readable only by the worker
    user, never onto a command line. curl retries transient failures and resumes.
    """
    config = f"{directory}/curl.conf"
    put_private_file(f'url = "{url}"\n', config)
    path = f"{directory}/image"
    argv = ["curl", "--fail", "--silent", "--show-error", "--retry", "8", "--retry-all-errors",
            "--retry-delay", "1", "--continue-at", "-", "--config", config, "--output", path]
    try:
        result = runner.run(argv, timeout=24 * 3600)
    finally:
        runner.run(["rm", "-f", config])
    if result.returncode != 0:
        raise CommandFailed(result, "downloading the image onto the worker")
    size = int(runner.run(["stat", "--format=%s", path]).stdout.strip())
    if size != expected_size:
        raise CommandFailed(result, f"download is {size} bytes, the object {expected_size}")
    return StagedImage(directory, path, size)


def second_opinion(qemu: QemuImg, path: str, fmt: str, expected_virtual_size: int) -> ImageInfo:
    """``qemu-img info`` and ``check`` on the worker, under resource limits; refuse disagreements."""
    try:
        info = qemu.info(path, fmt)
    except CommandFailed as exc:
        raise ImageRejected(f"qemu-img cannot read the image as {fmt}: {exc}") from None
    if info.format != fmt:
        raise ImageRejected(f"qemu-img reads the image as {info.format}, not {fmt}")
    if info.backing_filename:
        raise ImageRejected(f"the image has a backing file ({info.backing_filename!r})")
    if info.data_file:
        raise ImageRejected(f"the image has an external data file ({info.data_file!r})")
    if info.virtual_size != expected_virtual_size:
        raise ImageRejected(f"qemu-img reports a virtual size of {info.virtual_size} bytes, the header "
                            f"{expected_virtual_size}")
    if fmt in CHECKABLE_FORMATS:
        check = qemu.check(path, fmt)
        if not check.ok:
            raise ImageRejected(f"qemu-img check found {check.corruptions} corruption(s): {check.output[-2000:]}")
    return info


def remove_staging(runner: CommandRunner, directory: str) -> None:
    if directory.startswith("/var/tmp/oci-disk-import."):
        runner.run(["rm", "-rf", "--one-file-system", directory])
