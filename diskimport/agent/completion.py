"""Work on a thread of its own whose end (or failure) readers and the program wait on."""

import threading

from .events import TransferFailed
from .fetch import Download


class Outcome(object):
    """Work on a thread of its own, which readers and the end of the transfer wait on: it is done,
    or its failure (or the fetch's, which it passes on) reaches them."""

    def __init__(self, download):
        self.download = download
        self.cond = threading.Condition()
        self.done = False
        self.error = None

    def _outcome(self, work, what):
        try:
            work()
        except TransferFailed as exc:
            self.fail(exc)
            return
        except Exception as exc:  # a bug must not leave readers waiting forever
            self.fail(TransferFailed("%s failed: %r" % (what, exc)))
            return
        with self.cond:
            if self.error is None:  # else the fetch failed, and the work was stopped
                self.done = True
            self.cond.notify_all()

    def fail(self, error):
        Download.fail(self, error)  # the first failure kept, waiters woken (the same cond and error)
        self.download.fail(error)

    def wait_complete(self, timeout):
        with self.cond:
            if not self.done and self.error is None:
                self.cond.wait(timeout)
            if self.error is not None:
                raise self.error
            return self.done

    @property
    def fetched(self):
        return self.download.fetched
