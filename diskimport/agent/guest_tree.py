"""A guest's files, read from its mounted filesystems as the guest would see them, never the worker's.

The guest's root filesystem and the ones its ``/etc/fstab`` mounts below it (``/boot``,
``/boot/efi``, ``/usr``) are mounted read-only on the worker, each in a directory of its own.
A :class:`GuestTree` turns a guest path into the worker path that holds it, following the
guest's symbolic links the way its kernel would, except that nothing can lead out of the
guest: an absolute link restarts at the guest's root, ``..`` stops there, and a loop of links
ends after :data:`MAX_LINKS` (a hostile guest links ``/etc/fstab`` to ``/root/.ssh/id_rsa``:
that names the guest's file, not the worker's). Every read is bounded.
"""

import errno
import os
import stat

MAX_LINKS = 40
MAX_TEXT = 1024 * 1024  # a configuration file read as text: at most this many bytes


class GuestTree:
    """The guest's directory tree: ``mounts`` maps guest paths (``/``, ``/boot``) to worker paths."""

    def __init__(self, mounts):
        self.mounts = sorted(((_normal(guest), host) for guest, host in mounts.items()),
                             key=lambda m: -len(m[0]))

    def _host(self, parts):
        guest = "/" + "/".join(parts)
        for point, host in self.mounts:
            if point == "/":
                return os.path.join(host, *parts) if parts else host
            if guest == point or guest.startswith(point + "/"):
                rest = guest[len(point):].lstrip("/")
                return os.path.join(host, rest) if rest else host
        raise KeyError("no mount holds " + guest)

    def resolve(self, path):
        """The worker path of the guest's ``path`` (links followed inside the guest), or None
        when a component does not exist or the links go round."""
        pending = [p for p in path.split("/") if p]
        parts, links = [], 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(part)
            host = self._host(parts)
            try:
                info = os.lstat(host)
            except OSError:
                return None
            if stat.S_ISLNK(info.st_mode):
                links += 1
                if links > MAX_LINKS:
                    return None
                try:
                    target = os.readlink(host)
                except OSError:
                    return None
                parts.pop()
                if target.startswith("/"):
                    parts = []
                pending = [p for p in target.split("/") if p] + pending
            elif pending and not stat.S_ISDIR(info.st_mode):
                return None
        return self._host(parts)

    def exists(self, path):
        return self.resolve(path) is not None

    def is_file(self, path):
        host = self.resolve(path)
        return host is not None and stat.S_ISREG(os.lstat(host).st_mode)

    def is_dir(self, path):
        host = self.resolve(path)
        return host is not None and stat.S_ISDIR(os.lstat(host).st_mode)

    def open(self, path):
        """The guest's regular file ``path`` opened for reading (binary), or None."""
        host = self.resolve(path)
        if host is None:
            return None
        try:
            fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device in a hostile guest: not read
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def read_text(self, path, limit=MAX_TEXT):
        """The file as text (its first ``limit`` bytes, undecodable bytes replaced), or None."""
        f = self.open(path)
        if f is None:
            return None
        with f:
            return f.read(limit).decode("utf-8", "replace")

    def listdir(self, path):
        """The names in the guest's directory ``path``, sorted; [] when it is not a directory."""
        host = self.resolve(path)
        if host is None:
            return []
        try:
            return sorted(os.listdir(host))
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ENOENT, errno.EACCES):
                return []
            raise

    def glob(self, directory, predicate):
        """Guest paths of the entries of ``directory`` whose name ``predicate`` accepts."""
        return [directory.rstrip("/") + "/" + name for name in self.listdir(directory) if predicate(name)]


def _normal(path):
    return "/" + "/".join(p for p in path.split("/") if p and p != ".")
