"""Every change the adaptation makes to a guest, each original kept first, so all can be put back.

Writes go through the guest's own tree (:class:`~.guest_tree.GuestTree`): a guest path is
resolved the way the guest resolves it, never leading out of it, and the file is written in
place (its owner, mode and security labels stay). Before a file is changed or removed, it is
copied under the originals directory at its own path (``/etc/fstab`` is kept as
``<originals>/etc/fstab``); a file the adaptation creates is removed again on restore.
"""

import json
import os
import shutil
import stat
import time


class AdaptError(Exception):
    """What stopped the adaptation (the guest is restored)."""


class Changes:
    def __init__(self, tree, originals):
        self.tree = tree
        self.originals = originals
        self.made = []     # {"path", "action", "why", "kept"}: what the summary and the guest's log show
        self._undo = []    # (path, callable), the newest last
        self._kept = {}
        self._snapshots = {}  # guest path -> worker path of its copy from before this adaptation

    # -- paths --------------------------------------------------------------------------------

    def _host(self, path):
        """The worker path for writing the guest's ``path``: the file it resolves to, or a new name
        in a directory that exists in the guest."""
        host = self.tree.resolve(path)
        if host is not None:
            if not stat.S_ISREG(os.lstat(host).st_mode):
                raise AdaptError("%s is not a regular file in the guest" % path)
            return host
        parent = self.tree.resolve(os.path.dirname(path) or "/")
        if parent is None or not stat.S_ISDIR(os.lstat(parent).st_mode):
            raise AdaptError("the guest has no directory %s for %s" % (os.path.dirname(path), path))
        return os.path.join(parent, os.path.basename(path))

    def _directory(self, path):
        """The guest's directory ``path``, made where missing (each made one undone on restore)."""
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            here = "/" + "/".join(parts[:i])
            host = self.tree.resolve(here)
            if host is None:
                parent = self.tree.resolve("/" + "/".join(parts[:i - 1]))
                host = os.path.join(parent, parts[i - 1])
                os.mkdir(host, 0o755)
                self._undo.append((here, lambda h=host: os.rmdir(h)))
            elif not stat.S_ISDIR(os.lstat(host).st_mode):
                raise AdaptError("%s is not a directory in the guest" % here)
        return self.tree.resolve(path)

    # -- changes ------------------------------------------------------------------------------

    def keep(self, path):
        """Copy the guest's ``path`` under the originals directory (once); its kept path."""
        if path in self._kept:
            return self._kept[path]
        source = self._host(path)
        kept = self.originals + path
        target = os.path.join(self._directory(os.path.dirname(kept)), os.path.basename(kept))
        if os.path.lexists(target):
            # An earlier adaptation kept the guest's own file there: it stays, and what is there now
            # is copied aside for a restore of this adaptation only.
            snapshot = target + ".before-this-adaptation"
            shutil.copy2(source, snapshot)
            self._undo.append((kept, lambda: os.path.lexists(snapshot) and os.unlink(snapshot)))
            self._snapshots[path] = snapshot
        else:
            shutil.copy2(source, target)
            self._undo.append((kept, lambda: os.unlink(target)))
            self._snapshots[path] = target
        self._kept[path] = kept
        return kept

    def _before(self, path):
        """The worker path of the copy of ``path`` as it was before this adaptation (for a restore)."""
        return self._snapshots[path]

    def finish(self):
        """After a successful adaptation: the copies made for a restore only are removed."""
        for path, snapshot in self._snapshots.items():
            if snapshot.endswith(".before-this-adaptation") and os.path.lexists(snapshot):
                os.unlink(snapshot)

    def kept(self, path):
        """Where the original of ``path`` is kept, or None (it was not there)."""
        return self._kept.get(path)

    def write(self, path, content, why, mode=0o644):
        """Write ``content`` (text or bytes) to the guest's ``path`` if it differs from what is there."""
        data = content.encode() if isinstance(content, str) else content
        host = self._host(path)
        existed = os.path.exists(host)
        if existed:
            with open(host, "rb") as f:
                old = f.read()
            if old == data:
                return
            kept = self.keep(path)
            self._undo.append((path, lambda: _write(host, old)))
        else:
            self._directory(os.path.dirname(path))
            kept = None
            self._undo.append((path, lambda: os.unlink(host)))
        _write(host, data, None if existed else mode)
        earlier = next((c for c in self.made if c["path"] == path), None)
        if earlier is not None:  # a file changed twice (or removed, then written anew) is listed once
            earlier["why"] += "; " + why
            earlier["action"] = "changed" if earlier["action"] == "removed" else earlier["action"]
        else:
            self.made.append({"path": path, "action": "changed" if existed else "created", "why": why, "kept": kept})

    def remove(self, path, why):
        host = self._host(path)
        kept = self.keep(path)
        backup = self._before(path)
        os.unlink(host)
        self._undo.append((path, lambda: shutil.copy2(backup, host)))
        self.made.append({"path": path, "action": "removed", "why": why, "kept": kept})

    def unlink(self, path, why):
        """Remove the symbolic link ``path`` (a unit's enablement); its target is what is kept."""
        parent = self.tree.resolve(os.path.dirname(path))
        host = os.path.join(parent, os.path.basename(path))
        if not os.path.islink(host):
            return
        target = os.readlink(host)
        os.unlink(host)
        self._undo.append((path, lambda: os.symlink(target, host)))
        self.made.append({"path": path, "action": "disabled", "why": why, "kept": "link to " + target})

    def created_by_tool(self, path):
        """A file the guest's tool will make: removed on restore if it was not there before."""
        if self.tree.resolve(path) is None:
            parent = self.tree.resolve(os.path.dirname(path))
            if parent is not None:
                host = os.path.join(parent, os.path.basename(path))
                self._undo.append((path, lambda: os.path.lexists(host) and os.unlink(host)))
        elif path in self._kept:
            host, backup = self._host(path), self._before(path)
            self._undo.append((path, lambda: shutil.copy2(backup, host)))

    def discard(self, path):
        """Remove a file this adaptation created for its own use: neither kept nor listed."""
        host = self.tree.resolve(path)
        if host is not None:
            os.unlink(host)
        self.made = [c for c in self.made if c["path"] != path]
        self._undo = [(p, u) for p, u in self._undo if p != path]

    def restore(self):
        """Undo every change, newest first; the problems met (none: the guest is as it was)."""
        problems = []
        while self._undo:
            path, undo = self._undo.pop()
            try:
                undo()
            except OSError as exc:
                problems.append("%s: %s" % (path, exc))
        return problems

    def write_log(self, directory, started):
        """The list of changes inside the guest: ``changes.json`` and ``changes.log``."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
        lines = ["Changed by oci-disk-import at %s so that this machine boots and answers on OCI." % stamp,
                 "Each original is kept under %s at its own path." % self.originals, ""]
        lines += ["%-8s %s: %s%s" % (c["action"], c["path"], c["why"], " (kept: %s)" % c["kept"] if c["kept"] else "")
                  for c in self.made]
        listed = list(self.made)
        self.write(directory + "/changes.json", json.dumps({"at": stamp, "changes": listed}, indent=1) + "\n",
                   "the list of changes", mode=0o644)
        self.write(directory + "/changes.log", "\n".join(lines) + "\n", "the list of changes", mode=0o644)


def _write(host, data, mode=None):
    flags = os.O_WRONLY | os.O_TRUNC | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(host, flags, mode if mode is not None else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
