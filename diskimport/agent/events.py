"""What a worker program tells the orchestrator, and what ends a transfer.

Events go to stdout as JSON lines, one object each with its ``event`` name; a transfer that
cannot go on raises :class:`TransferFailed`, or :class:`Refused` with the refusal code the
importer refuses the image with (its ``failed`` event carries the code).
"""

import json
import sys


class TransferFailed(Exception):
    """The object cannot be fetched (changed, gone, or failing beyond the retry budget)."""

    code = None


class Refused(TransferFailed):
    """The object's data is not what the inspection said (a ``code`` the importer refuses with)."""

    def __init__(self, code, message):
        TransferFailed.__init__(self, message)
        self.code = code


def emit(event, **fields):
    fields["event"] = event
    sys.stdout.write(json.dumps(fields, sort_keys=True) + "\n")
    sys.stdout.flush()


def stop_requested(stop_file):
    """None while the importer still reads; else "stop" (or "abort" to stop before completion)."""
    try:
        with open(stop_file) as f:
            return f.read().strip() or "stop"
    except OSError:
        return None
