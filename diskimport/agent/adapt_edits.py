"""The text of a Linux guest's configuration files as the adaptation changes them (pure functions).

Each function takes a file's text and returns the new text (the same text when nothing needs
to change), so what changes can be shown and tested without a guest:

- kernel command lines (GRUB's generated config and its defaults, BLS entries, grubenv):
  ``root=``/``resume=`` named by a kernel device name become ``UUID=``; ``console=ttyS0`` is
  added beside the consoles there are (``tty0`` kept, or added when there was none, so the
  screen still shows the boot); ``net.ifnames=0`` makes the first network card ``eth0``
  whatever its slot on the new host;
- ``/etc/fstab``: device names become ``UUID=``; an entry whose device is not on the disk gets
  ``nofail``;
- the network: every interface's configuration is turned off and ``eth0`` takes DHCP,
  in the format the guest uses.
"""

import re

SERIAL = "console=ttyS0,115200"
FIRST_NIC = "eth0"
NAMES_OFF = "net.ifnames=0"
MARK = "# oci-disk-import:"


def edit_cmdline(cmdline, devices, console=True, names=True):
    """The kernel command line with device-named ``root=``/``resume=`` set by UUID (``devices``
    maps a device name to its UUID), a serial console, and classic interface names."""
    words = cmdline.split()
    out = []
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key in ("root", "resume") and value in devices:
            word = "%s=UUID=%s" % (key, devices[value])
        out.append(word)
    consoles = [w for w in out if w.startswith("console=")]
    if console and not any(w.startswith("console=ttyS") for w in consoles):
        if not consoles:
            out.append("console=tty0")
        out.append(SERIAL)
    if names and not any(w.startswith("net.ifnames=") for w in out):
        out.append(NAMES_OFF)
    if out == words:
        return cmdline
    return " ".join(out)


LINUX_LINE = re.compile(r"^(\s*linux(?:16|efi)?\s+\S+)([^\n]*)$", re.M)


def edit_grub_cfg(text, devices, console=True, names=True):
    """GRUB's generated config: every ``linux`` line's arguments edited."""
    return LINUX_LINE.sub(lambda m: m.group(1) + _spaced(edit_cmdline(m.group(2), devices, console, names)), text)


def _spaced(args):
    return (" " + args.strip()) if args.strip() else ""


def edit_bls_entry(text, devices, console=True, names=True):
    """A Boot Loader Specification entry: its ``options`` line edited, unless it takes them from
    GRUB's environment (``$kernelopts``), which is edited instead (:func:`edit_grubenv`)."""
    def edit(match):
        if "$kernelopts" in match.group(2):
            return match.group(0)
        return match.group(1) + _spaced(edit_cmdline(match.group(2), devices, console, names))
    return re.sub(r"^(\s*options)([^\n]*)$", edit, text, flags=re.M)


def edit_grub_defaults(text, devices, console=True, names=True):
    """``/etc/default/grub``: ``GRUB_CMDLINE_LINUX`` edited (added when missing), so the next
    kernel update's generated config keeps the changes; ``GRUB_DISABLE_LINUX_UUID=true``
    (which makes grub-mkconfig name the root by device) turned off."""
    lines, seen = text.splitlines(), False
    out = []
    for line in lines:
        match = re.match(r'^(\s*GRUB_CMDLINE_LINUX=)(["\']?)(.*?)\2\s*$', line)
        if match:
            seen = True
            line = '%s"%s"' % (match.group(1), edit_cmdline(match.group(3), devices, console, names))
        elif re.match(r"^\s*GRUB_DISABLE_LINUX_UUID\s*=\s*[\"']?true", line):
            line = "%s %s" % (MARK, line.strip())
        out.append(line)
    if not seen:
        out.append('GRUB_CMDLINE_LINUX="%s"' % edit_cmdline("", devices, console, names))
    edited = "\n".join(out) + "\n"
    return text if edited == text or edited == text + "\n" else edited


def edit_grubenv(data, devices, console=True, names=True):
    """GRUB's environment block (exactly 1024 bytes, padded with ``#``): ``kernelopts`` edited.
    None when the block cannot be edited in place (not a block, or no room)."""
    if len(data) != 1024 or not data.startswith(b"# GRUB Environment Block\n"):
        return None
    body = data.rstrip(b"#")
    lines = body.decode("utf-8", "replace").split("\n")
    changed = False
    for i, line in enumerate(lines):
        if line.startswith("kernelopts="):
            new = "kernelopts=" + edit_cmdline(line[len("kernelopts="):], devices, console, names)
            changed = changed or new != line
            lines[i] = new
    if not changed:
        return data
    edited = "\n".join(lines).encode()
    if len(edited) > 1024:
        return None
    return edited + b"#" * (1024 - len(edited))


def edit_fstab(text, devices, missing):
    """``/etc/fstab`` with device names set by UUID (``devices``); an entry whose device name is
    in ``missing`` (not on the disk) gets ``nofail``, so the machine boots without it."""
    out = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] in devices:
            line = line.replace(fields[0], "UUID=" + devices[fields[0]], 1)
        elif len(fields) >= 2 and fields[0] in missing and fields[1] != "/":
            options = fields[3] if len(fields) > 3 else "defaults"
            if "nofail" not in options.split(","):
                rebuilt = fields[:3] + [options + ",nofail"] + fields[4:]
                if len(fields) == 2:
                    rebuilt = fields + ["auto", "defaults,nofail"]
                elif len(fields) == 3:
                    rebuilt = fields + ["defaults,nofail"]
                line = "\t".join(rebuilt)
        out.append(line)
    edited = "\n".join(out) + "\n"
    return text if edited in (text, text + "\n") else edited


# -- the network -------------------------------------------------------------------------------

def edit_interfaces(text):
    """ifupdown's ``interfaces``: every stanza but the loopback's commented out (``source``
    lines kept); the caller adds the DHCP stanza for ``eth0``."""
    out, active = [], False
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("auto", "allow-hotplug", "allow-auto", "iface", "mapping", "rename"):
            names = words[1:] if words[0] != "iface" else words[1:2]
            active = not all(n == "lo" for n in names)
        elif words and words[0] in ("source", "source-directory"):
            active = False
        if active and words and not line.lstrip().startswith("#"):
            line = "%s %s" % (MARK, line)
        out.append(line)
    edited = "\n".join(out) + "\n"
    return text if edited in (text, text + "\n") else edited


IFUPDOWN_DHCP = "\n%s the first network card takes its address by DHCP\nauto %s\nallow-hotplug %s\niface %s inet dhcp\n" % (
    MARK, FIRST_NIC, FIRST_NIC, FIRST_NIC)
IFCFG_DHCP = "%s the first network card takes its address by DHCP\nDEVICE=%s\nTYPE=Ethernet\nBOOTPROTO=dhcp\nONBOOT=yes\n" % (
    MARK, FIRST_NIC)
NM_DHCP = ("%s the first network card takes its address by DHCP\n[connection]\nid=oci-dhcp\ntype=ethernet\n"
           "interface-name=%s\nautoconnect=true\n\n[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n") % (MARK, FIRST_NIC)
NETPLAN_DHCP = "%s the first network card takes its address by DHCP\nnetwork:\n  version: 2\n  ethernets:\n    %s:\n      dhcp4: true\n" % (
    MARK, FIRST_NIC)
NETWORKD_DHCP = "%s the first network card takes its address by DHCP\n[Match]\nName=%s\n\n[Network]\nDHCP=ipv4\n" % (
    MARK, FIRST_NIC)
