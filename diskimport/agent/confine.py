"""``python3 agent.pyz confine ROOT PROGRAM ARG...``: run one of a guest's own programs inside the
guest's root, with less power than root has on the worker.

The adaptation starts it as ``unshare --mount --net --ipc --uts --pid --fork
--mount-proc=ROOT/proc python3 agent.pyz confine ROOT ...``: no network, no view of the
worker's processes. It makes the guest's ``/proc/sys`` and ``/proc/sysrq-trigger`` read-only,
enters ``ROOT`` (``chroot``), keeps only the capabilities a tool
that writes files as root needs (owners, modes, reading and writing any file of the guest)
and drops the others from its bounding set (``mount``, ``chroot``, ``mknod``, modules, raw
I/O, ptrace: what would lead out of the root), sets ``no_new_privs``, and runs the guest's
program with a clean environment. The worker VM is single-use; this keeps a guest's
programs, which the adaptation must run (its initramfs tool), from reaching past the guest.
"""

import ctypes
import os
import sys

KEEP = {0, 1, 2, 3, 4, 6, 7}  # CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, SETGID, SETUID
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
READ_ONLY = ("proc/sys", "proc/sysrq-trigger")  # the kernel's settings, and its magic keys
LAST_CAP = 63
ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C",
               "LC_ALL": "C", "HOME": "/root", "TERM": "dumb"}


def drop_capabilities():
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(LAST_CAP + 1):
        if cap not in KEEP and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: past the kernel's last capability
                break
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, %d)" % cap)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def read_only(root):
    """The kernel settings under the guest's /proc made read-only (bind mounts in this mount
    namespace), so that root in the guest cannot change the worker's kernel through them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for name in READ_ONLY:
        path = os.path.join(root, name).encode()
        if not os.path.exists(path):  # a kernel without magic keys has no sysrq-trigger
            continue
        if libc.mount(path, path, None, MS_BIND | MS_REC, None) != 0 or \
                libc.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
            raise OSError(ctypes.get_errno(), "making %s read-only" % name)


def main_argv(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: python3 agent.pyz confine ROOT PROGRAM [ARG...]\n")
        return 2
    root, program = argv[0], argv[1:]
    read_only(root)
    os.chroot(root)
    os.chdir("/")
    drop_capabilities()
    try:
        os.execve(program[0], program, ENVIRONMENT)
    except OSError as exc:
        sys.stderr.write("confine: %s: %s\n" % (program[0], exc.strerror))
        return 127
