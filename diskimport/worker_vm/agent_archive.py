"""The worker's programs (:mod:`diskimport.agent`) as one file the worker's ``python3`` runs.

A zip archive (a zipapp) of the package's sources under ``agent/``, with a ``__main__.py``
that runs its dispatcher: ``python3 agent.pyz stream|upload CONFIG``. It is built in memory
from the sources, once per process, and is the same bytes for the same sources (sorted
entries, fixed times and modes, stored, no compiled files), so one ``put_private_file``
ships every program and what they share.
"""

from __future__ import annotations

import functools
import io
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "agent"
ARCHIVE_NAME = "agent.pyz"

_ENTRY = b"import sys\n\nfrom agent.__main__ import main\n\nsys.exit(main(sys.argv[1:]))\n"


def build(package: Path = PACKAGE) -> bytes:
    """The archive of the ``*.py`` files in ``package``: deterministic, stored uncompressed."""
    entries = [("__main__.py", _ENTRY)]
    entries += [(f"agent/{path.name}", path.read_bytes()) for path in sorted(package.glob("*.py"))]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return out.getvalue()


@functools.cache
def agent_archive() -> bytes:
    """The archive of :mod:`diskimport.agent` as it is on disk (built on first use)."""
    return build()
