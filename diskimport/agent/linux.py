"""The facts of a Linux guest, read from its own files through a :class:`~.guest_tree.GuestTree`.

- the distribution and version (``os-release``, else ``redhat-release`` / ``debian_version``);
- every installed kernel (``/boot/vmlinuz-*``) with its initramfs, and the storage and network
  drivers each really has: the modules inside its initramfs (:mod:`.initramfs`), the ones built
  into the kernel (``modules.builtin``, else ``/boot/config-*``), the ones installed for it;
- which tool builds the initramfs (initramfs-tools, dracut, mkinitrd) and whether it is set
  to include only the drivers of the machine it runs on (``MODULES=dep``, ``hostonly``);
- the bootloader's kernel command lines (GRUB's generated config, BLS entries) and its
  defaults (``/etc/default/grub``), how ``root=`` names the root device, the consoles;
- ``/etc/fstab``, each entry with how it names its device and where on the disk that is;
- the network configuration of ifupdown, ifcfg, NetworkManager, netplan, systemd-networkd and
  udev's persistent-net rules, with every pin to an interface name or MAC address;
- cloud-init and its datasources, hypervisor tools and whether they start at boot, SELinux.
"""

import re

from .initramfs import InitramfsError, module_names, read_names

STORAGE_DRIVERS = ("virtio_blk", "virtio_scsi", "virtio_pci", "sd_mod", "vmw_pvscsi", "mptspi", "mptsas",
                   "mptscsih", "hv_storvsc", "hv_vmbus", "ata_piix", "ahci", "nvme", "buslogic", "xen_blkfront")
NETWORK_DRIVERS = ("virtio_net", "e1000", "e1000e", "vmxnet3", "hv_netvsc", "xen_netfront")
DRIVERS = STORAGE_DRIVERS + NETWORK_DRIVERS
CONFIG_OF = {  # kernel config symbol -> module
    "VIRTIO_BLK": "virtio_blk", "SCSI_VIRTIO": "virtio_scsi", "VIRTIO_PCI": "virtio_pci", "BLK_DEV_SD": "sd_mod",
    "VMWARE_PVSCSI": "vmw_pvscsi", "FUSION_SPI": "mptspi", "FUSION_SAS": "mptsas", "HYPERV_STORAGE": "hv_storvsc",
    "HYPERV": "hv_vmbus", "ATA_PIIX": "ata_piix", "SATA_AHCI": "ahci", "BLK_DEV_NVME": "nvme",
    "SCSI_BUSLOGIC": "buslogic", "XEN_BLKDEV_FRONTEND": "xen_blkfront", "VIRTIO_NET": "virtio_net",
    "E1000": "e1000", "E1000E": "e1000e", "VMXNET3": "vmxnet3", "HYPERV_NET": "hv_netvsc",
    "XEN_NETDEV_FRONTEND": "xen_netfront",
}
INITRAMFS_NAMES = ("/boot/initrd.img-{v}", "/boot/initramfs-{v}.img", "/boot/initrd-{v}", "/boot/initrd-{v}.img")
HYPERVISOR_TOOLS = (  # name, files that show it is installed, systemd units that start it
    ("open-vm-tools", ("/usr/bin/vmtoolsd",), ("open-vm-tools.service", "vmtoolsd.service", "vgauth.service")),
    ("VMware Tools", ("/etc/vmware-tools/locations", "/usr/lib/vmware-tools"), ("vmware-tools.service",)),
    ("Hyper-V daemons", ("/usr/sbin/hv_kvp_daemon", "/usr/sbin/hypervkvpd"),
     ("hv-kvp-daemon.service", "hypervkvpd.service", "hv_kvp_daemon.service", "hyperv-daemons.hv-kvp-daemon.service")),
    ("VirtualBox Guest Additions", ("/usr/sbin/VBoxService", "/opt/VBoxGuestAdditions"),
     ("vboxadd.service", "vboxadd-service.service")),
)
UNIT_DIRECTORIES = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
DEVICE_NAME = re.compile(r"^/dev/((s|h|v|xv)d[a-z]+[0-9]*|nvme[0-9]+n[0-9]+(p[0-9]+)?)$")


def inspect_linux(tree, regions):
    facts = {"os": os_release(tree)}
    facts["kernels"] = kernels(tree)
    facts["initramfs_tool"] = initramfs_tool(tree)
    facts["bootloader"] = bootloader(tree)
    facts["fstab"] = [dict(entry, naming=naming(entry["spec"]), location=resolve_spec(entry["spec"], regions))
                      for entry in fstab_entries(tree)]
    facts["network"] = network(tree)
    facts["cloud_init"] = cloud_init(tree)
    facts["hypervisor_tools"] = hypervisor_tools(tree)
    facts["selinux"] = selinux(tree)
    return facts


# -- the operating system -------------------------------------------------------------------

def _key_values(text):
    values = {}
    for line in (text or "").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[key.strip()] = value
    return values


def os_release(tree):
    text = tree.read_text("/etc/os-release") or tree.read_text("/usr/lib/os-release")
    if text:
        values = _key_values(text)
        return {"type": "linux", "distribution": values.get("ID"), "version": values.get("VERSION_ID"),
                "name": values.get("PRETTY_NAME") or values.get("NAME"), "like": values.get("ID_LIKE", "").split()}
    redhat = tree.read_text("/etc/redhat-release")
    if redhat:
        version = re.search(r"release ([0-9.]+)", redhat)
        return {"type": "linux", "distribution": "rhel-like", "version": version.group(1) if version else None,
                "name": redhat.strip(), "like": ["rhel"]}
    debian = tree.read_text("/etc/debian_version")
    return {"type": "linux", "distribution": "debian", "version": (debian or "").strip() or None,
            "name": "Debian " + (debian or "").strip(), "like": []}


# -- kernels and their drivers --------------------------------------------------------------

def _version_key(version):
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def kernels(tree):
    found = []
    versions = sorted({name[len("vmlinuz-"):] for name in tree.listdir("/boot")
                       if name.startswith("vmlinuz-") and "rescue" not in name}, key=_version_key)
    for version in versions:
        kernel = {"version": version, "image": "/boot/vmlinuz-" + version}
        kernel["builtin"] = sorted(builtin_drivers(tree, version))
        kernel["installed"] = sorted(installed_drivers(tree, version))
        initramfs = next((p.format(v=version) for p in INITRAMFS_NAMES if tree.is_file(p.format(v=version))), None)
        kernel["initramfs"] = initramfs
        kernel["initramfs_drivers"] = []
        kernel["initramfs_error"] = None
        if initramfs is None:
            kernel["initramfs_error"] = "no initramfs for this kernel in /boot"
        else:
            try:
                names, compressions = read_names(tree.resolve(initramfs))
                modules = module_names(names)
                inside = modules.get(version, set())
                kernel["initramfs_drivers"] = sorted(m for m in inside if m in DRIVERS)
                kernel["initramfs_modules"] = len(inside)
                kernel["initramfs_compression"] = compressions
                if modules and version not in modules:
                    kernel["initramfs_error"] = "its modules are for kernel %s" % ", ".join(sorted(modules))
            except (InitramfsError, OSError) as exc:
                kernel["initramfs_error"] = "cannot be read: %s" % exc
        found.append(kernel)
    return found


def builtin_drivers(tree, version):
    for base in ("/lib/modules/", "/usr/lib/modules/"):
        text = tree.read_text(base + version + "/modules.builtin", limit=4 * 1024 * 1024)
        if text is not None:
            names = {line.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_") for line in text.splitlines()}
            return names & set(DRIVERS)
    config = tree.read_text("/boot/config-" + version, limit=4 * 1024 * 1024) or ""
    return {module for symbol, module in CONFIG_OF.items() if "\nCONFIG_%s=y\n" % symbol in "\n" + config + "\n"}


def installed_drivers(tree, version):
    """The drivers of :data:`DRIVERS` installed as modules for ``version`` (``modules.dep``)."""
    for base in ("/lib/modules/", "/usr/lib/modules/"):
        text = tree.read_text(base + version + "/modules.dep", limit=16 * 1024 * 1024)
        if text is not None:
            names = {line.split(":", 1)[0].rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")
                     for line in text.splitlines() if ":" in line}
            return names & set(DRIVERS)
    return set()


def initramfs_tool(tree):
    if tree.exists("/usr/sbin/update-initramfs") or tree.exists("/sbin/update-initramfs"):
        conf = _key_values(tree.read_text("/etc/initramfs-tools/initramfs.conf"))
        for name in tree.listdir("/etc/initramfs-tools/conf.d"):
            conf.update(_key_values(tree.read_text("/etc/initramfs-tools/conf.d/" + name)))
        modules = conf.get("MODULES", "most")
        return {"tool": "initramfs-tools", "host_only": modules == "dep", "setting": "MODULES=" + modules}
    if tree.exists("/usr/bin/dracut") or tree.exists("/sbin/dracut") or tree.exists("/usr/sbin/dracut"):
        texts = [tree.read_text("/etc/dracut.conf") or ""]
        for directory in ("/usr/lib/dracut/dracut.conf.d", "/etc/dracut.conf.d"):
            texts += [tree.read_text(path) or "" for path in tree.glob(directory, lambda n: n.endswith(".conf"))]
        hostonly = "yes"  # dracut's default since 2013 on the distributions that use it
        for text in texts:
            for match in re.finditer(r'^\s*hostonly\s*=\s*"?(yes|no)"?', text, re.M):
                hostonly = match.group(1)
        return {"tool": "dracut", "host_only": hostonly == "yes", "setting": "hostonly=" + hostonly}
    if tree.exists("/sbin/mkinitrd") or tree.exists("/usr/sbin/mkinitrd"):
        return {"tool": "mkinitrd", "host_only": None, "setting": None}
    return {"tool": None, "host_only": None, "setting": None}


# -- bootloader, root device and consoles ---------------------------------------------------

def bootloader(tree):
    entries, config = [], None
    grubenv = _key_values(tree.read_text("/boot/grub2/grubenv") or tree.read_text("/boot/grub/grubenv"))
    for path in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/etc/grub2.cfg", "/boot/efi/EFI/debian/grub.cfg",
                 "/boot/efi/EFI/redhat/grub.cfg"):
        text = tree.read_text(path)
        if text is None:
            continue
        config = config or path
        for match in re.finditer(r"^\s*linux(?:16|efi)?\s+(\S+)\s*(.*)$", text, re.M):
            cmdline = match.group(2).replace("$kernelopts", grubenv.get("kernelopts", "")).strip()
            entries.append({"source": path, "kernel": match.group(1), "cmdline": cmdline})
    for path in tree.glob("/boot/loader/entries", lambda n: n.endswith(".conf")):
        values = {}
        for line in (tree.read_text(path) or "").splitlines():
            key, _, value = line.strip().partition(" ")
            values[key] = value.strip()
        if "linux" in values:
            options = values.get("options", "").replace("$kernelopts", grubenv.get("kernelopts", ""))
            entries.append({"source": path, "kernel": values["linux"], "cmdline": options.strip()})
    defaults = _key_values(tree.read_text("/etc/default/grub"))
    kept = {k: defaults[k] for k in ("GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT", "GRUB_TERMINAL",
                                     "GRUB_SERIAL_COMMAND", "GRUB_ENABLE_BLSCFG") if k in defaults}
    kind = "grub2" if config or defaults else ("systemd-boot" if entries else None)
    cmdlines = [e["cmdline"] for e in entries] or [" ".join(
        v for v in (defaults.get("GRUB_CMDLINE_LINUX"), defaults.get("GRUB_CMDLINE_LINUX_DEFAULT")) if v)]
    roots = sorted({a[5:] for c in cmdlines for a in c.split() if a.startswith("root=")})
    consoles = sorted({a[8:].split(",")[0] for c in cmdlines for a in c.split() if a.startswith("console=")})
    return {"kind": kind, "config": config, "entries": entries, "defaults": kept,
            "root": [{"spec": r, "naming": naming(r)} for r in roots], "consoles": consoles,
            "serial_console": any(c.startswith("ttyS") for c in consoles)}


def naming(spec):
    """How a device is named: ``uuid``, ``label``, ``partuuid``, ``lvm`` (a mapper or VG/LV path,
    stable), ``device`` (a kernel name like ``/dev/sda2``, which changes with the controller), ``other``."""
    upper = spec.upper()
    if upper.startswith("UUID=") or spec.startswith("/dev/disk/by-uuid/"):
        return "uuid"
    if upper.startswith("LABEL=") or spec.startswith("/dev/disk/by-label/"):
        return "label"
    if upper.startswith("PARTUUID=") or spec.startswith("/dev/disk/by-partuuid/"):
        return "partuuid"
    if spec.startswith("/dev/mapper/") or re.match(r"^/dev/[^/]+/[^/]+$", spec) and not spec.startswith("/dev/disk/"):
        return "lvm"
    if DEVICE_NAME.match(spec):
        return "device"
    return "other"


def fstab_entries(tree):
    entries = []
    for line in (tree.read_text("/etc/fstab") or "").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            entries.append({"spec": fields[0], "mountpoint": fields[1].replace("\\040", " "),
                            "type": fields[2] if len(fields) > 2 else "auto",
                            "options": fields[3] if len(fields) > 3 else "defaults"})
    return entries


def resolve_spec(spec, regions):
    """The location on the disk (``p2``, ``p3:vg/root``) of the device ``spec`` names, or None."""
    kind = naming(spec)
    value = spec.split("=", 1)[1] if "=" in spec else spec.rsplit("/", 1)[-1]
    for region in regions:
        if kind == "uuid" and (region.get("uuid") or "").lower() == value.lower():
            return region["location"]
        if kind == "label" and region.get("label") == value:
            return region["location"]
        if kind == "partuuid" and (region.get("partuuid") or "").lower() == value.lower():
            return region["location"]
        if kind == "lvm" and ":" in region["location"]:
            vg_lv = region["location"].split(":", 1)[1]
            if spec.startswith("/dev/mapper/"):
                mapper = spec[len("/dev/mapper/"):]
                if mapper == vg_lv.replace("-", "--").replace("/", "-", 1):
                    return region["location"]
            elif spec[len("/dev/"):] == vg_lv:
                return region["location"]
    if kind == "device":
        number = re.search(r"([0-9]+)$", spec)
        if number:  # the boot disk was the guest's first: its partition of that number, if any
            for region in regions:
                if region["location"] == "p" + number.group(1) and re.match(r"^/dev/(s|h|v|xv)da[0-9]+$|^/dev/nvme0n1p", spec):
                    return region["location"]
    return None


# -- network --------------------------------------------------------------------------------

def network(tree):
    found = []

    def add(source, kind, interface, method, pins):
        found.append({"source": source, "kind": kind, "interface": interface, "method": method, "pins": pins})

    interfaces = ["/etc/network/interfaces"] + tree.glob("/etc/network/interfaces.d", lambda n: not n.startswith("."))
    for path in interfaces:
        for match in re.finditer(r"^\s*iface\s+(\S+)\s+inet6?\s+(\S+)", tree.read_text(path) or "", re.M):
            if match.group(1) != "lo":
                pins = ["name " + match.group(1)]
                add(path, "ifupdown", match.group(1), match.group(2), pins)
    for path in tree.glob("/etc/sysconfig/network-scripts", lambda n: n.startswith("ifcfg-") and n != "ifcfg-lo"):
        values = _key_values(tree.read_text(path))
        pins = (["name " + values["DEVICE"]] if values.get("DEVICE") else []) + \
               (["mac " + values["HWADDR"].lower()] if values.get("HWADDR") else []) + \
               (["mac " + values["MACADDR"].lower()] if values.get("MACADDR") else [])
        add(path, "ifcfg", values.get("DEVICE") or path.rsplit("ifcfg-", 1)[-1],
            (values.get("BOOTPROTO") or "none").lower(), pins)
    for directory in ("/etc/NetworkManager/system-connections",):
        for path in tree.glob(directory, lambda n: not n.startswith(".")):
            text = tree.read_text(path) or ""
            if re.search(r"^\s*type\s*=\s*(loopback)", text, re.M):
                continue
            name = re.search(r"^\s*interface-name\s*=\s*(\S+)", text, re.M)
            mac = re.search(r"^\s*mac-address\s*=\s*(\S+)", text, re.M)
            method = re.search(r"\[ipv4\][^\[]*?^\s*method\s*=\s*(\S+)", text, re.M | re.S)
            add(path, "networkmanager", name.group(1) if name else None, method.group(1) if method else None,
                (["name " + name.group(1)] if name else []) + (["mac " + mac.group(1).lower()] if mac else []))
    for path in tree.glob("/etc/netplan", lambda n: n.endswith((".yaml", ".yml"))):
        ethernets = _yaml_tree(tree.read_text(path) or "").get("network", {})
        ethernets = ethernets.get("ethernets", {}) if isinstance(ethernets, dict) else {}
        for name, config in (ethernets.items() if isinstance(ethernets, dict) else []):
            config = config if isinstance(config, dict) else {}
            match = config.get("match") if isinstance(config.get("match"), dict) else None
            pins = []
            if match is None:
                pins.append("name " + name)
            else:
                if match.get("macaddress"):
                    pins.append("mac " + str(match["macaddress"]).lower())
                if match.get("name") and not any(c in str(match["name"]) for c in "*?["):
                    pins.append("name " + str(match["name"]))
            if config.get("set-name"):
                pins.append("name " + str(config["set-name"]))
            dhcp = str(config.get("dhcp4", "")).lower() in ("true", "yes", "on")
            add(path, "netplan", config.get("set-name") or (match or {}).get("name") or name,
                "dhcp" if dhcp else ("static" if config.get("addresses") else None), pins)
    for path in tree.glob("/etc/systemd/network", lambda n: n.endswith(".network")):
        text = tree.read_text(path) or ""
        names = re.findall(r"^\s*Name\s*=\s*(\S+)", text, re.M)
        macs = re.findall(r"^\s*MACAddress\s*=\s*(\S+)", text, re.M)
        method = "dhcp" if re.search(r"^\s*DHCP\s*=\s*(yes|ipv4|true)", text, re.M) else (
            "static" if re.search(r"^\s*Address\s*=", text, re.M) else None)
        add(path, "networkd", names[0] if names else None, method,
            ["name " + n for n in names if "*" not in n] + ["mac " + m.lower() for m in macs])
    rules = "/etc/udev/rules.d/70-persistent-net.rules"
    for match in re.finditer(r'ATTR\{address\}=="([0-9a-fA-F:]{17})".*?NAME="([^"]+)"', tree.read_text(rules) or ""):
        add(rules, "udev", match.group(2), None, ["mac " + match.group(1).lower(), "name " + match.group(2)])
    return found


def _yaml_tree(text):
    """Netplan's YAML as nested dicts, by indentation: ``key: value`` pairs and blocks; list items
    (``- x``, ``[x, y]``) as lists of strings. Enough for the keys read here, not YAML at large."""
    root, stack = {}, [(-1, None)]
    stack[0] = (-1, root)
    last_key = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        while len(stack) > 1 and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        body = line.strip()
        if body.startswith("- "):
            key = last_key.get(id(parent))
            if key is not None and isinstance(parent, dict):
                if not isinstance(parent.get(key), list):
                    parent[key] = []
                parent[key].append(body[2:].strip().strip("'\""))
            continue
        key, sep, value = body.partition(":")
        if not sep or not isinstance(parent, dict):
            continue
        key, value = key.strip().strip("'\""), value.strip()
        last_key[id(parent)] = key
        if value.startswith("[") and value.endswith("]"):
            parent[key] = [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
        elif value:
            parent[key] = value.strip("'\"")
        else:
            child = {}
            parent[key] = child
            stack.append((indent, child))
    return root


# -- cloud-init, hypervisor tools, SELinux ---------------------------------------------------

def cloud_init(tree):
    installed = tree.exists("/etc/cloud/cloud.cfg") and (tree.exists("/usr/bin/cloud-init")
                                                          or tree.exists("/bin/cloud-init"))
    datasources = []
    texts = [tree.read_text("/etc/cloud/cloud.cfg") or ""] + [
        tree.read_text(p) or "" for p in tree.glob("/etc/cloud/cloud.cfg.d", lambda n: n.endswith(".cfg"))]
    for text in texts:
        match = re.search(r"^datasource_list:\s*\[([^\]]*)\]", text, re.M)
        if match:
            datasources = [d.strip().strip("'\"") for d in match.group(1).split(",") if d.strip()]
    disabled = tree.exists("/etc/cloud/cloud-init.disabled")
    return {"installed": installed, "datasources": datasources, "disabled": disabled}


def _enabled(tree, unit):
    """Whether a systemd unit is enabled: a link to it in a ``*.wants`` directory of /etc."""
    for target in tree.listdir("/etc/systemd/system"):
        if target.endswith(".wants") and unit in tree.listdir("/etc/systemd/system/" + target):
            return True
    return False


def hypervisor_tools(tree):
    found = []
    for name, files, units in HYPERVISOR_TOOLS:
        present = [f for f in files if tree.exists(f)]
        if present:
            found.append({"name": name, "found": present[0],
                          "units": [u for u in units if any(tree.exists(d + "/" + u) for d in UNIT_DIRECTORIES)],
                          "enabled": [u for u in units if _enabled(tree, u)]})
    return found


def selinux(tree):
    text = tree.read_text("/etc/selinux/config")
    if text is None:
        return None
    return _key_values(text).get("SELINUX", "").lower() or None
