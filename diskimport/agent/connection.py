"""Persistent HTTP connections to Object Storage, from the address the SSH session arrived on."""

import errno
import http.client
import os
import ssl
from urllib.parse import urlsplit

from .events import emit


class Retryable(Exception):
    """A failure worth trying again: a 429 or 5xx reply, or a connection that ended early."""


class PersistentConnection(object):
    """One keep-alive connection to the host of ``url``, opened when first needed and again
    after :meth:`close`: what a :class:`~.fetch.Fetcher` and an upload's :class:`~.upload.Sender` are.

    It connects from ``bind`` (an address of this host, or None: routing's choice); an
    address this host does not have is reported (``unbound``) and routing chooses from then on.
    """

    def __init__(self, url, bind, timeout):
        self.url = urlsplit(url)
        self.bind = bind
        self.timeout = timeout
        self.conn = None

    def _connect(self):
        conn = self._connection((self.bind, 0) if self.bind else None)
        try:
            conn.connect()
        except OSError as exc:
            if not self.bind or exc.errno != errno.EADDRNOTAVAIL:
                raise
            emit("unbound", address=self.bind, error=str(exc))  # not an address of this host: let routing choose
            self.bind = None
            conn = self._connection(None)
        return conn

    def _connection(self, source):
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(self.url.hostname, self.url.port or 443, timeout=self.timeout,
                                               source_address=source, context=ssl.create_default_context())
        return http.client.HTTPConnection(self.url.hostname, self.url.port or 80, timeout=self.timeout,
                                          source_address=source)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def ssh_server_address():
    """The local address this SSH session arrived on (``SSH_CONNECTION``'s third field)."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    return fields[2] if len(fields) == 4 else None
