"""Flow ``rollback-sync``: a synced volume back to the version it held before its last sync.

OCI restores a backup onto a new volume only: the run restores the newest backup a sync of the
volume wrote after (:mod:`diskimport.sync_backups`) as a new volume tagged as the
import of the version it holds, which the object's next sync then updates, and marks the synced
volume ``import-state=rolled-back``, kept. A retried or repeated run finds the volume it restored.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as current_flow_run

from blocks import DEFAULT_BLOCK, ImportSettings, OCICredentials
from diskimport import sync_backups
from flows.reporting import refusal_reported
from flows.tasks import step_task


@step_task("restore-sync-backup", retries=2, delays=[5, 15])
def restore_sync_backup(credentials_block: str, compartment_id: str, volume_id: str) -> sync_backups.RolledBack:
    clients = OCICredentials.load(credentials_block).clients()
    token = f"rollback-{volume_id.rsplit('.', 1)[-1][-24:]}-{str(current_flow_run.id or 'local')[:8]}"
    return sync_backups.rollback(clients, compartment_id, volume_id, token, get_run_logger())


@flow(name="rollback-sync", flow_run_name=lambda: f"rollback {str(current_flow_run.parameters['volume_id'])[-12:]}")
def rollback_sync(volume_id: str, credentials_block: str = DEFAULT_BLOCK,
                  settings_block: str = DEFAULT_BLOCK) -> dict[str, Any]:
    """Restore ``volume_id``'s newest sync backup as a new volume (the version before that sync)."""
    with refusal_reported(volume_id):
        settings = ImportSettings.load(settings_block)
        rolled = restore_sync_backup(credentials_block, settings.compartment_id, volume_id)
        create_markdown_artifact("\n".join([
            f"# Rolled back `{volume_id}`", "",
            f"Volume `{rolled.restored_volume_id}` holds version `{rolled.etag}` again, restored from backup "
            f"`{rolled.backup_id}`; the sync to `{rolled.undone_etag}` is undone. The synced volume is kept, "
            "tagged `import-state=rolled-back`."]), key="rollback-summary", description="Rollback summary")
        return rolled.as_dict()
