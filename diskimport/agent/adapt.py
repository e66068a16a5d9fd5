"""``python3 agent.pyz adapt CONFIG``: a written Linux guest changed, offline, so that it boots on
OCI's paravirtualized devices and answers on its network.

Run in a mount namespace of its own, like ``guest``. CONFIG names the device, the places the
checks found (:mod:`.guest`), the root's location and where its fstab mounts the others
(``placed``), and the agent archive. The guest's filesystems are mounted read-write (no
device files, no set-user-ID) and its own files say what to change (:func:`.linux.inspect_linux`):

- virtio drivers added to every kernel's initramfs that lacks them, by the guest's own tool
  (initramfs-tools' ``update-initramfs``, ``dracut``) run inside the guest's root
  (:mod:`.confine`), its configuration keeping them for the next kernel;
- ``root=`` and fstab devices named by a kernel name set by UUID (an fstab device not on the
  disk gets ``nofail``); ``console=ttyS0`` added beside the consoles; the network's
  configuration turned off and the first card (``eth0``, with ``net.ifnames=0``) set to DHCP,
  unless cloud-init writes the network at first boot (:mod:`.adapt_edits`);
- hypervisor tools' units disabled (their links removed, the units kept);
- an SELinux relabel at next boot (``/.autorelabel``) where SELinux is on.

Every file changed is first copied to :data:`KEPT` ``/originals`` under its own path, and the
list of changes is written to :data:`KEPT` ``/changes.log`` inside the guest. Whatever fails,
everything changed so far is put back as it was. It prints JSON: ``ok``, ``changes``,
``notes``, or ``error`` and whether the guest was ``restored``.
"""

import json
import os
import stat
import subprocess
import time

from . import adapt_edits as edits
from .adapt_changes import AdaptError, Changes
from .guest import mount, private_namespace
from .guest_tree import GuestTree
from .linux import inspect_linux, naming, resolve_spec

KEPT = "/var/lib/oci-disk-import/adaptation"
VIRTIO = ("virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net")
TOOL_SECONDS = 900
REBUILD_CONF = "/etc/initramfs-tools/conf.d/zz-oci-disk-import-rebuild"
DRACUT_CONF = "/etc/dracut.conf.d/90-oci-disk-import-virtio.conf"
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9))


def mount_root(config, work):
    """The guest's root filesystem, read-write."""
    by_location = {r["location"]: r for r in config["regions"]}
    root = os.path.join(work, "root")
    os.mkdir(root)
    error = mount(config["device"], by_location[config["root"]], root, writable=True)
    if error:
        raise AdaptError("the root filesystem %s cannot be mounted read-write: %s" % (config["root"], error))
    return root


def mount_placed(config, tree, mounted, made):
    """What the guest's fstab mounts below its root (``/boot``, ``/boot/efi``), read-write, where
    the guest mounts it (a missing mount point is made: ``made``, removed again on a restore)."""
    by_location = {r["location"]: r for r in config["regions"]}
    for point, location in sorted(config.get("placed", {}).items(), key=lambda p: p[0].count("/")):
        if point == "/":
            continue
        host = tree.resolve(point)
        parent = tree.resolve(os.path.dirname(point))
        if host is None and parent is not None and stat.S_ISDIR(os.lstat(parent).st_mode):
            host = os.path.join(parent, os.path.basename(point))
            os.mkdir(host, 0o755)
            made.append(host)
        if host is None or not stat.S_ISDIR(os.lstat(host).st_mode):
            raise AdaptError("the guest's mount point %s is not a directory" % point)
        error = mount(config["device"], by_location[location], host, writable=True)
        if error:
            raise AdaptError("%s (%s) cannot be mounted read-write: %s" % (location, point, error))
        mounted.append(host)


def unmount(points):
    failed = []
    subprocess.run(["sync"])
    for point in reversed(points):
        result = subprocess.run(["umount", point], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if result.returncode != 0:
            failed.append("%s: %s" % (point, result.stderr.decode("utf-8", "replace").strip()))
    return failed


def device_names(facts, regions):
    """Kernel device names the guest uses (fstab, ``root=``, ``resume=``) -> the UUID of what is
    there on this disk; and the names whose device is not on the disk."""
    specs = {e["spec"] for e in facts["fstab"] if e["naming"] == "device"}
    for entry in facts["bootloader"]["entries"]:
        specs |= {a.split("=", 1)[1] for a in entry["cmdline"].split() if a.startswith(("root=", "resume="))}
    specs |= {r["spec"] for r in facts["bootloader"]["root"]}
    by_location = {r["location"]: r for r in regions}
    found, missing = {}, set()
    for spec in sorted(s for s in specs if naming(s) == "device"):
        location = resolve_spec(spec, regions)
        uuid = by_location[location].get("uuid") if location else None
        if uuid:
            found[spec] = uuid
        else:
            missing.add(spec)
    return found, missing


def needs_network(facts):
    """Whether the network configuration keeps the machine off a new card: a static address, or
    a pin to a MAC or to a name (not a pattern); cloud-init, when on, writes it anew itself."""
    cloud = facts["cloud_init"]
    if cloud.get("installed") and not cloud.get("disabled"):
        return False
    lines = [e["cmdline"].split() for e in facts["bootloader"]["entries"]]
    classic = bool(lines) and all(edits.NAMES_OFF in words for words in lines)  # eth0 is the first card
    for entry in facts["network"]:
        pins = [p for p in entry.get("pins") or [] if not (classic and p == "name " + edits.FIRST_NIC)]
        if entry.get("method") in ("static", "manual", "none") or any(
                p.startswith("mac ") or ("*" not in p and "?" not in p) for p in pins):
            return True
    return False


def edit_boot(changes, tree, facts, devices, console, names):
    sources = sorted({e["source"] for e in facts["bootloader"]["entries"]})
    why = "the kernel command line: root by UUID, a serial console, the first network card as eth0"
    for path in sources:
        text = tree.read_text(path)
        if text is None:
            continue
        edited = (edits.edit_bls_entry if path.startswith("/boot/loader/") else edits.edit_grub_cfg)(
            text, devices, console, names)
        changes.write(path, edited, why)
    if tree.is_file("/etc/default/grub"):
        text = tree.read_text("/etc/default/grub")
        changes.write("/etc/default/grub", edits.edit_grub_defaults(text, devices, console, names),
                      why + " (kept by the next kernel update)")
    if tree.is_file("/etc/kernel/cmdline"):  # what kernel-install gives the next kernel's BLS entry
        text = tree.read_text("/etc/kernel/cmdline").strip()
        edited = edits.edit_cmdline(text, devices, console, names)
        if edited != text:
            changes.write("/etc/kernel/cmdline", edited + "\n", why + " (kept by the next kernel update)")
    for path in ("/boot/grub2/grubenv", "/boot/grub/grubenv"):
        f = tree.open(path)
        if f is None:
            continue
        with f:
            data = f.read(4096)
        edited = edits.edit_grubenv(data, devices, console, names)
        if edited is not None:
            changes.write(path, edited, why + " (kernelopts)")


def edit_fstab(changes, tree, devices, missing, notes):
    text = tree.read_text("/etc/fstab")
    if text is None:
        return
    changes.write("/etc/fstab", edits.edit_fstab(text, devices, missing), "devices by UUID, not by kernel name")
    for spec in sorted(missing):
        notes.append("%s is not on this disk: its fstab entry gets nofail (the root cannot)" % spec)


def edit_network(changes, tree, facts):
    why = "the old machine's interface names, MACs and static addresses keep a new card off the network"
    kinds = {e["kind"] for e in facts["network"]}
    for entry in facts["network"]:
        path, kind = entry["source"], entry["kind"]
        if kind == "ifupdown":
            changes.write(path, edits.edit_interfaces(tree.read_text(path) or ""), why)
        elif kind in ("ifcfg", "networkmanager", "netplan", "networkd", "udev") and tree.is_file(path):
            changes.remove(path, why)
    wanted = "the first network card (eth0) takes its address by DHCP"
    if "ifupdown" in kinds:
        text = tree.read_text("/etc/network/interfaces") or ""
        if edits.IFUPDOWN_DHCP.strip() not in text:
            changes.write("/etc/network/interfaces", text + edits.IFUPDOWN_DHCP, wanted)
    if "ifcfg" in kinds:
        changes.write("/etc/sysconfig/network-scripts/ifcfg-" + edits.FIRST_NIC, edits.IFCFG_DHCP, wanted)
    if "networkmanager" in kinds:
        changes.write("/etc/NetworkManager/system-connections/oci-dhcp.nmconnection", edits.NM_DHCP, wanted,
                      mode=0o600)
    if "netplan" in kinds:
        changes.write("/etc/netplan/50-oci-dhcp.yaml", edits.NETPLAN_DHCP, wanted, mode=0o600)
    if "networkd" in kinds:
        changes.write("/etc/systemd/network/50-oci-dhcp.network", edits.NETWORKD_DHCP, wanted)


def disable_tools(changes, tree, facts):
    for tool in facts["hypervisor_tools"]:
        for unit in tool["enabled"]:
            for wants in tree.listdir("/etc/systemd/system"):
                link = "/etc/systemd/system/%s/%s" % (wants, unit)
                if wants.endswith(".wants") and unit in tree.listdir("/etc/systemd/system/" + wants):
                    changes.unlink(link, "%s waits for or fails on its old hypervisor at boot" % tool["name"])


def missing_drivers(kernel):
    have = set(kernel.get("initramfs_drivers") or []) | set(kernel.get("builtin") or [])
    return [d for d in VIRTIO if d not in have]


def rebuild_initramfs(changes, tree, facts, root, archive, rebuild_anyway):
    """Add the virtio drivers to every kernel's initramfs that lacks them, with the guest's own tool."""
    kernels = [k for k in facts["kernels"] if tree.is_dir("/lib/modules/" + k["version"])
               or tree.is_dir("/usr/lib/modules/" + k["version"])]
    todo = [k for k in kernels if missing_drivers(k) or rebuild_anyway]
    if not todo:
        return [], ""
    tool = facts["initramfs_tool"]["tool"]
    why = "virtio drivers for OCI's paravirtualized disk and network, kept for the next kernel"
    if tool == "initramfs-tools":
        text = tree.read_text("/etc/initramfs-tools/modules") or ""
        listed = {line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")}
        added = [d for d in VIRTIO if d not in listed]
        if added:
            changes.write("/etc/initramfs-tools/modules", text + "%s %s\n%s\n" % (
                edits.MARK, "virtio drivers for OCI", "\n".join(added)), why)
        if facts["initramfs_tool"]["host_only"]:  # MODULES=dep would look at the worker's devices
            changes.write(REBUILD_CONF, "MODULES=most\n", "for this rebuild only")
    elif tool == "dracut":
        changes.write(DRACUT_CONF, 'add_drivers+=" %s "\n' % " ".join(VIRTIO), why)
    else:
        raise AdaptError("the guest's initramfs tool (%s) cannot be run to add the virtio drivers" % (
            tool or "none found"))
    output = []
    with guest_devices(tree):
        for kernel in todo:
            version, existing = kernel["version"], kernel.get("initramfs")
            image = existing or ("/boot/initrd.img-%s" if tool == "initramfs-tools" else "/boot/initramfs-%s.img") % version
            if existing:
                changes.keep(image)
            changes.created_by_tool(image)
            if tool == "initramfs-tools":
                program = "/usr/sbin/update-initramfs" if tree.is_file("/usr/sbin/update-initramfs") else "/sbin/update-initramfs"
                argv = [program, "-u" if existing else "-c", "-k", version]
            else:
                program = next((p for p in ("/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut") if tree.is_file(p)))
                argv = [program, "--force", "--no-hostonly", image, version]
            output.append(run_confined(root, archive, argv))
            changes.made.append({"path": image, "action": "rebuilt" if existing else "created",
                                 "why": "by the guest's %s, with the virtio drivers" % program.rsplit("/", 1)[-1],
                                 "kept": changes.kept(image)})
    if facts["initramfs_tool"]["host_only"] and tool == "initramfs-tools":
        changes.discard(REBUILD_CONF)
    return [k["version"] for k in todo], "\n".join(output)


class guest_devices:
    """The few device files a guest's tool needs, on a tmpfs over the guest's ``/dev`` (its own
    device files are on a ``nodev`` mount anyway), for as long as the tools run."""

    def __init__(self, tree):
        self.host = tree.resolve("/dev")
        if self.host is None or not stat.S_ISDIR(os.lstat(self.host).st_mode):
            raise AdaptError("the guest has no /dev directory")

    def __enter__(self):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755,nosuid,noexec,size=1m", "tmpfs", self.host],
                       check=True)
        for name, major, minor in DEVICES:
            os.mknod(os.path.join(self.host, name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, os.path.join(self.host, name))
        os.mkdir(os.path.join(self.host, "shm"))
        return self

    def __exit__(self, *exc):
        subprocess.run(["umount", self.host])


def run_confined(root, archive, argv):
    """One of the guest's programs in its root (:mod:`.confine`); its output, or AdaptError."""
    proc = os.path.join(root, "proc")
    if not os.path.isdir(proc) or os.path.islink(proc):
        raise AdaptError("the guest has no /proc directory to run its tools with")
    command = ["unshare", "--mount", "--net", "--ipc", "--uts", "--pid", "--fork", "--mount-proc=" + proc,
               "python3", archive, "confine", root] + argv
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TOOL_SECONDS)
    except subprocess.TimeoutExpired:
        raise AdaptError("the guest's %s did not finish in %d s" % (" ".join(argv), TOOL_SECONDS))
    output = result.stdout.decode("utf-8", "replace")[-4000:]
    if result.returncode != 0:
        raise AdaptError("the guest's %s failed (exit %d): %s" % (" ".join(argv), result.returncode, output.strip()))
    return output


def adapt(config, work):
    regions = config["regions"]
    root = mount_root(config, work)
    mounted = [root]
    tree = GuestTree({"/": root})
    changes, notes, started, points = Changes(tree, KEPT + "/originals"), [], time.time(), []
    try:
        mount_placed(config, tree, mounted, points)
        notes += ["the mount point %s that the fstab names was missing: it was made" % p[len(root):] for p in points]
        facts = inspect_linux(tree, regions)
        devices, missing = device_names(facts, regions)
        console = not facts["bootloader"]["serial_console"]
        network = needs_network(facts)
        if not network and facts["cloud_init"].get("installed") and not facts["cloud_init"].get("disabled"):
            notes.append("cloud-init writes the network at first boot: its configuration is left as it is")
        if devices or console or network:
            edit_boot(changes, tree, facts, devices, console, network)
        if devices or missing:
            edit_fstab(changes, tree, devices, missing, notes)
        if network:
            edit_network(changes, tree, facts)
        disable_tools(changes, tree, facts)
        rebuilt, output = rebuild_initramfs(changes, tree, facts, root, config["archive"],
                                            bool(devices) and facts["initramfs_tool"]["tool"] == "dracut")
        after = inspect_linux(tree, regions)
        for kernel in after["kernels"]:
            if kernel["version"] in rebuilt and missing_drivers(kernel):
                raise AdaptError("kernel %s's rebuilt initramfs still lacks %s (are they installed for it?)" % (
                    kernel["version"], ", ".join(missing_drivers(kernel))))
        if changes.made and facts["selinux"] in ("enforcing", "permissive"):
            changes.write("/.autorelabel", "", "files changed offline need their SELinux labels")
        if changes.made:
            changes.write_log(KEPT, started)
        changes.finish()
        result = {"ok": True, "changes": changes.made, "notes": notes, "rebuilt": rebuilt, "tool_output": output}
    except Exception as exc:  # whatever stopped it, what it changed goes back
        problems = changes.restore()
        result = {"ok": False, "error": str(exc), "restored": not problems, "restore_problems": problems,
                  "changes": changes.made, "notes": notes}
    problems = unmount(mounted[1:])
    for point in reversed(points if not result["ok"] else []):
        os.rmdir(point)
    problems += unmount(mounted[:1])
    if problems:
        result.update(ok=False, error=result.get("error") or "the guest's filesystems did not unmount cleanly",
                      unmount_problems=problems)
    result["seconds"] = round(time.time() - started, 1)
    return result


def main(config_path):
    with open(config_path) as f:
        config = json.load(f)
    if not private_namespace():
        print_json({"ok": False, "error": "adapt: run me in a mount namespace of my own "
                                          "(unshare --mount --propagation private)"})
        return 2
    work = config["work"]
    try:
        result = adapt(config, work)
    except AdaptError as exc:  # nothing changed: the guest could not be mounted
        result = {"ok": False, "error": str(exc), "restored": True, "changes": []}
    print_json(result)
    return 0 if result["ok"] else 1


def print_json(value):
    import sys
    sys.stdout.write(json.dumps(value, sort_keys=True))
    sys.stdout.flush()
