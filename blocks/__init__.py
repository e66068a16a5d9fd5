"""Prefect blocks: OCI credentials, worker shape, import settings, and where imported machines run.

Register them with ``prefect block register -m blocks``. The flows load each block by
the name their parameters give, ``oci-disk-import`` unless told otherwise: save one
block of each type under that name and no parameter needs to name them.
"""

from .credentials import OCICredentials
from .settings import ImportSettings
from .target import TargetMachine
from .worker import WorkerShape

DEFAULT_BLOCK = "oci-disk-import"

__all__ = ["DEFAULT_BLOCK", "OCICredentials", "ImportSettings", "TargetMachine", "WorkerShape"]
