"""What readers and the end of a program wait on: work that completes, or fails with its first failure."""

import threading

from .events import TransferFailed


class Completion(object):
    """Something readers and the end of a program wait on: it completes, or its first failure
    reaches every waiter.

    A subclass says when it is complete (:meth:`_complete`, asked with ``cond`` held) and
    notifies ``cond`` when that may have changed; :meth:`fail` and :meth:`wait_complete` are
    the same for all (a download, a decompression or decoding, the parts of an upload).
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.error = None

    def _complete(self):
        raise NotImplementedError

    def fail(self, error):
        """Keep the first failure and wake every waiter: each raises it."""
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def wait_complete(self, timeout):
        """Whether it is complete, after waiting up to ``timeout`` seconds for that; raises its failure."""
        with self.cond:
            if not self._complete() and self.error is None:
                self.cond.wait(timeout)
            if self.error is not None:
                raise self.error
            return self._complete()


class Outcome(Completion):
    """Work on a thread of its own, which readers and the end of the transfer wait on: it is done,
    or its failure (or the fetch's, which it passes on) reaches them."""

    def __init__(self, download):
        Completion.__init__(self)
        self.download = download
        self.done = False

    def _complete(self):
        return self.done

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
        Completion.fail(self, error)
        self.download.fail(error)  # the fetch stops too

    @property
    def fetched(self):
        return self.download.fetched
