"""What the NBD export serves: the image as it arrives, each range sent once it is there."""


class NbdSource(object):
    """The image, read over NBD (:class:`~.nbd.NbdExport`) while it arrives.

    A read of [start, end) is sent as *parts*, in order: ``(None, (pos, length), pin)``, bytes
    of the staging file (``pin``: what the source keeps in the file for the read until
    :meth:`release`, or None), or ``(data, None, None)``, bytes held in memory. A source
    implements :meth:`ready`, and :meth:`wait_for` or its own :meth:`acquire` and
    :meth:`release`; one that knows where the image's zeros are sets ``knows_zeros`` and
    implements :meth:`extents`.
    """

    knows_zeros = False  # whether extents() says where the zeros are (NBD's base:allocation)

    def ready(self, start, end):
        """The parts of [start, end) if they can all be sent now; else None, without waiting
        (also once the transfer failed: the read that waits, in :meth:`acquire`, raises it)."""
        raise NotImplementedError

    def acquire(self, start, end):
        """The parts of [start, end), once they can all be sent; raises the transfer's failure."""
        self.wait_for(start, end)
        return [(None, (start, end - start), None)]

    def release(self, parts):
        """The parts :meth:`ready` or :meth:`acquire` gave have been sent (or the read failed)."""

    def wait_for(self, start, end):
        """Block until [start, end) is in the staging file; raises the transfer's failure."""
        raise NotImplementedError

    def extents(self, offset, length, limit):
        """``[(length, zero?)]`` from ``offset``: at most ``limit`` runs, covering up to ``length``
        bytes, each all zeros or not (only if ``knows_zeros``)."""
        raise NotImplementedError
