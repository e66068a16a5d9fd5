"""``python3 agent.pyz guest CONFIG``: what operating system a written disk holds, read-only.

Run in a mount namespace of its own (``unshare --mount --propagation private``): it refuses
to run otherwise, so its mounts vanish with it however it ends. CONFIG names the device and
the filesystems the checks found on it (location, byte range, type, UUID, label). Each one of
a type it can read is mounted read-only (``ro``, and no journal replay: ``noload``,
``norecovery``, ``rescue=nologreplay``) through a read-only loop device over its range; the
one with an ``/etc/fstab`` and an ``os-release`` is the root, and what its fstab mounts
below it that is on the disk is placed there (:class:`~.guest_tree.GuestTree`).

What it prints (JSON) is the guest's facts, read from the guest's own files (:mod:`.linux`);
what they mean for a launch is the orchestrator's to say.
"""

import json
import os
import subprocess
import sys
import tempfile

from .guest_tree import GuestTree
from .linux import inspect_linux, fstab_entries, resolve_spec

MOUNT_OPTIONS = {
    "ext2": ["ro", "noload"], "ext3": ["ro", "noload"], "ext4": ["ro", "noload"],
    "xfs": ["ro", "norecovery"], "btrfs": ["ro", "rescue=nologreplay"], "vfat": ["ro"],
}
SAFE = ["nodev", "nosuid", "noexec"]


def private_namespace():
    """Whether this process's mounts are its own (not its parent's, so not the worker's)."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/%d/ns/mnt" % os.getppid())
    except OSError:
        return False


def mount(device, region, directory, writable=False):
    """Mount ``region`` of ``device`` read-only at ``directory`` (read-write for the adaptation,
    its programs runnable but still no device files or set-user-ID); the error text, or None."""
    if writable:
        return _mount_writable(device, region, directory)
    options = MOUNT_OPTIONS[region["filesystem"]] + SAFE + [
        "loop", "offset=%d" % region["offset"], "sizelimit=%d" % region["size"]]
    kind = region["filesystem"]
    result = subprocess.run(["mount", "-t", kind, "-o", ",".join(options), device, directory],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0 and kind == "btrfs":  # kernels before 5.9 know only the old name
        options = [o if o != "rescue=nologreplay" else "nologreplay" for o in options]
        result = subprocess.run(["mount", "-t", kind, "-o", ",".join(options), device, directory],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        return (result.stderr or result.stdout).decode("utf-8", "replace").strip()[-500:]
    return None


WINDOWS_HIVES = (("SYSTEM", 256 * 1024 * 1024), ("SOFTWARE", 512 * 1024 * 1024))


def _mount_writable(device, region, directory):
    """Mount ``region`` read-write through a loop device of its own.

    ``mount -o loop`` reuses a loop device that already covers the same range, and the read-only
    one an inspection just detached may still be there (the kernel lets it go once whatever probed
    it, udev or an LVM scan, closes it): the filesystem would then be mounted read-only. A new
    device is made instead, and detached at once: the kernel frees it when the filesystem is
    unmounted, as it does for ``mount -o loop``.
    """
    attach = subprocess.run(["losetup", "--find", "--show", "--offset", str(region["offset"]),
                             "--sizelimit", str(region["size"]), device], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if attach.returncode != 0:
        return (attach.stderr or attach.stdout).decode("utf-8", "replace").strip()[-500:]
    loop = attach.stdout.decode().strip()
    try:
        result = subprocess.run(["mount", "-t", region["filesystem"], "-o", "rw,nodev,nosuid", loop, directory],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        subprocess.run(["losetup", "--detach", loop], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        return (result.stderr or result.stdout).decode("utf-8", "replace").strip()[-500:]
    return None


def windows_hives(device, region, work):
    """The SYSTEM and SOFTWARE hives of a Windows on the NTFS ``region``, copied into ``work``
    with ``ntfscat`` through a read-only loop device (nothing mounted): ``{name: path}``, or
    None when the region holds no ``/Windows/System32/config/SYSTEM``."""
    attach = subprocess.run(["losetup", "--read-only", "--find", "--show", "--offset", str(region["offset"]),
                             "--sizelimit", str(region["size"]), device], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if attach.returncode != 0:
        return None
    loop = attach.stdout.decode().strip()
    try:
        found = {}
        for name, limit in WINDOWS_HIVES:
            target = os.path.join(work, "%s-%s" % (region["location"].replace("/", "_").replace(":", "_"), name))
            if _copy_capped(["ntfscat", loop, "/Windows/System32/config/" + name], target, limit):
                found[name] = target
            elif name == "SYSTEM":
                return None
        return found
    finally:
        subprocess.run(["losetup", "--detach", loop], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _copy_capped(argv, target, limit):
    """Run ``argv`` into the file ``target``; False (and no file) if it fails or writes over ``limit`` bytes."""
    written = 0
    with open(target, "wb") as out:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            while True:
                chunk = process.stdout.read(1024 * 1024)
                if not chunk:
                    break
                written += len(chunk)
                if written > limit:
                    break
                out.write(chunk)
        finally:
            process.stdout.close()
            if written > limit:
                process.kill()
            code = process.wait()
    if written > limit or code != 0 or written == 0:
        os.unlink(target)
        return False
    return True


def is_root(tree):
    return tree.is_file("/etc/fstab") and (tree.is_file("/etc/os-release") or tree.is_file("/usr/lib/os-release")
                                             or tree.is_file("/etc/redhat-release")
                                             or tree.is_file("/etc/debian_version"))


def inspect(config):
    device, regions = config["device"], config["regions"]
    work = tempfile.mkdtemp(prefix="guest-", dir=config.get("work") or None)
    mounted, problems = {}, []
    for index, region in enumerate(regions):
        if region.get("filesystem") not in MOUNT_OPTIONS:
            continue
        directory = os.path.join(work, "m%d" % index)
        os.mkdir(directory)
        error = mount(device, region, directory)
        if error:
            problems.append("%s (%s) could not be mounted read-only: %s" % (
                region["location"], region["filesystem"], error))
        else:
            mounted[region["location"]] = directory
    by_location = {r["location"]: r for r in regions}
    roots = [loc for loc, d in sorted(mounted.items()) if is_root(GuestTree({"/": d}))]
    report = {"os": {"type": None}, "mounted": sorted(mounted), "problems": problems, "roots": roots}
    if not roots:
        for region in regions:
            hives = windows_hives(device, region, config["work"]) if region.get("filesystem") == "ntfs" else None
            if hives:
                report["os"] = {"type": "windows"}
                report.update(root=region["location"], hives=hives)
                return report
        report["os"]["reason"] = ("no filesystem on the disk holds /etc/fstab and an os-release, or "
                                  "/Windows/System32/config/SYSTEM (no Linux or Windows root found)"
                                  if mounted or regions else "no filesystem on the disk could be read")
        return report
    root = roots[0]
    if len(roots) > 1:
        problems.append("several filesystems look like a Linux root (%s); %s is inspected" % (", ".join(roots), root))
    mounts = {"/": mounted[root]}
    placed = {"/": root}
    for entry in fstab_entries(GuestTree(mounts)):
        point = entry["mountpoint"]
        if point in ("/", "none", "swap") or not point.startswith("/") or entry["type"] in ("swap", "nfs", "nfs4", "cifs"):
            continue
        location = resolve_spec(entry["spec"], regions)
        if location is not None and location in mounted:
            mounts[point] = mounted[location]
            placed[point] = location
    report.update(inspect_linux(GuestTree(mounts), regions))
    report["root"] = root
    report["placed"] = placed
    report["root_filesystem"] = {k: by_location[root].get(k) for k in ("filesystem", "uuid", "label")}
    return report


def main(config_path):
    with open(config_path) as f:
        config = json.load(f)
    if not private_namespace():
        sys.stderr.write("guest: run me in a mount namespace of my own (unshare --mount --propagation private)\n")
        return 2
    report = inspect(config)
    sys.stdout.write(json.dumps(report, sort_keys=True))
    sys.stdout.flush()
    return 0
