"""Prefect blocks: OCI credentials, worker shape and import settings.

Register them with ``prefect block register -m blocks``.
"""

from .credentials import OCICredentials
from .settings import ImportSettings
from .worker import WorkerShape

__all__ = ["OCICredentials", "ImportSettings", "WorkerShape"]
