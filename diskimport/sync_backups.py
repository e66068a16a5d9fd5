"""The way back from a sync: a backup of the volume before a sync writes, and the rollback to it.

Before a sync writes onto the volume of an earlier import, the volume has a volume backup
tagged with the version it holds (``import-etag``, ``import-id``, ``import-version-time``,
``import-virtual-size``) and the version the sync writes (``import-sync-after``). The sync
writes only once the backup is AVAILABLE.

That backup is taken ahead: every sync-mode import, once its volume is ready (detached, tagged
imported), asks for a backup of the volume as it now is (:func:`backup_ahead`). The next sync
finds it, tags it with the version it writes, and waits for nothing: a backup, which on OCI
takes minutes for a large volume, is off the sync's path and off a cutover's downtime. A sync
takes a backup of its own (and waits for it, fetching and checking the new version meanwhile)
when there is none of the version the volume holds, or when the volume was attached to anything
after the backup was taken (it may hold more than that version).

A sync that fails, or a version that is not accepted, is undone by :func:`rollback`: OCI
restores a backup onto a new volume only, so the rollback restores the newest backup a sync wrote
after as a new volume, tagged as the import of the version it holds (the one the next sync
finds), and marks the synced volume ``import-state=rolled-back`` (kept, never deleted: what the
sync wrote is not lost either).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import oci

from . import cloud, contract
from .errors import InvalidRequest
from .records import FoundVolume

models = oci.core.models
TAG_SYNC_AFTER = "import-sync-after"   # a sync backup: the version (ETag) the sync wrote after it
TAG_SYNC_OF = "import-sync-of"         # the volume a sync backup (taken ahead or before a sync) is of
TAG_ROLLED_BACK_FROM = "import-rolled-back-from"  # a volume a rollback restored: the synced volume
STATE_ROLLED_BACK = "rolled-back"
BACKUP_TIMEOUT = 6 * 3600.0
# what a sync backup keeps of the volume's tags: the version it holds, and whose it is
KEPT_TAGS = (contract.TAG_MANAGED_BY, contract.TAG_IMPORT_ID, contract.TAG_OBJECT, contract.TAG_ETAG,
             contract.TAG_SOURCE, contract.TAG_VERSION_TIME, contract.TAG_VIRTUAL_SIZE)


def sync_backups(clients: cloud.Clients, compartment_id: str, volume_id: str) -> list[Any]:
    """The sync backups of a volume (taken ahead of a sync, or used by one) that are not on their way
    out, newest first."""
    backups = oci.pagination.list_call_get_all_results(clients.blockstorage.list_volume_backups, compartment_id,
                                                       volume_id=volume_id).data
    return sorted((b for b in backups if (b.freeform_tags or {}).get(TAG_SYNC_OF) == volume_id
                   and b.lifecycle_state in ("CREATING", "AVAILABLE")), key=lambda b: b.time_created, reverse=True)


def backup_ahead(clients: cloud.Clients, compartment_id: str, volume_id: str, retry_token: str,
                 log: logging.Logger) -> Any | None:
    """Ask for a backup of a sync-mode import's volume as it is once ready, for the next sync to
    write after (:func:`backup_before_sync`); nobody waits for it. None when OCI would not take it:
    the next sync then takes its own."""
    try:
        volume = cloud.get_volume(clients, volume_id)
        etag = (volume.freeform_tags or {}).get(contract.TAG_ETAG, "")
        backup = _create(clients, volume_id, volume.freeform_tags or {}, {},
                         f"ahead of the next sync of {etag.strip(chr(34))[:40]}", retry_token)
    except oci.exceptions.ServiceError as exc:
        log.warning("volume %s: no backup ahead of the next sync (%s %s); that sync will take its own",
                    volume_id, exc.status, exc.code)
        return None
    log.info("volume %s (version %s) is backed up ahead of its next sync: backup %s", volume_id, etag, backup.id)
    return backup


def attached_since(clients: cloud.Clients, compartment_id: str, volume_id: str, since: Any) -> list[str]:
    """The attachments of the volume made after ``since``: whatever they wrote is in no backup before."""
    attachments = oci.pagination.list_call_get_all_results(clients.compute.list_volume_attachments, compartment_id,
                                                           volume_id=volume_id).data
    return [a.id for a in attachments if a.time_created > since]


def backup_before_sync(clients: cloud.Clients, compartment_id: str, base: FoundVolume, after_etag: str,
                       retry_token: str, log: logging.Logger) -> Any:
    """The backup of ``base`` (the version it holds) that the sync to ``after_etag`` writes after, as
    created (CREATING or AVAILABLE), tagged with that version: the one taken ahead when it still holds
    all the volume holds, else one taken now. The sync waits for it (:func:`wait_backup`) before its
    first write. A failed sync's volume was backed up for that sync: its backup is the one."""
    held = base.held_whole
    backup = None
    for found in sync_backups(clients, compartment_id, base.id):
        tags = found.freeform_tags or {}
        if tags.get(contract.TAG_ETAG) != held:
            continue
        if TAG_SYNC_AFTER not in tags and base.state == contract.STATE_IMPORTED:
            since = attached_since(clients, compartment_id, base.id, found.time_created)
            if since:
                log.info("backup %s of volume %s is not used: the volume was attached since (%s)", found.id,
                         base.id, ", ".join(since))
                continue
        backup = found
        break
    if backup is not None:
        tags = dict(backup.freeform_tags or {})
        if tags.get(TAG_SYNC_AFTER) != after_etag[:255]:
            details = models.UpdateVolumeBackupDetails(display_name=_before_sync_name(after_etag),
                                                       freeform_tags={**tags, TAG_SYNC_AFTER: after_etag[:255]})
            backup = cloud.with_backoff(clients.blockstorage.update_volume_backup, backup.id, details).data
        log.info("volume %s (version %s) has its backup for this sync already: backup %s", base.id, held, backup.id)
    elif base.state in (contract.STATE_FAILED, contract.STATE_WRITING):
        raise InvalidRequest("sync-backup-missing", f"volume {base.id} was left by a failed sync and its backup "
                             f"(of version {held}) is gone: roll it back is impossible, so it is not synced again; "
                             "import onto a new volume with sync false")
    else:
        def create() -> Any:
            return _create(clients, base.id, base.tags, {TAG_SYNC_AFTER: after_etag[:255]},
                           _before_sync_name(after_etag), retry_token)

        try:
            backup = create()
        except oci.exceptions.ServiceError as exc:
            if exc.status != 409:
                raise
            # a backup of the volume is under way (the one taken ahead, not used): once it is done, ask again
            log.info("volume %s: backup refused while another is under way (%s); waiting for it", base.id, exc.code)
            for busy in sync_backups(clients, compartment_id, base.id):
                if busy.lifecycle_state == "CREATING":
                    cloud.wait_for_state(lambda b=busy: clients.blockstorage.get_volume_backup(b.id).data,
                                         ("AVAILABLE", "FAULTY", "TERMINATED"), f"backup {busy.id} of volume {base.id}",
                                         BACKUP_TIMEOUT)
            backup = create()
        log.info("backing up volume %s (version %s) before the sync: backup %s", base.id, held, backup.id)
    return backup


def _create(clients: cloud.Clients, volume_id: str, volume_tags: dict[str, str], extra: dict[str, str],
            name: str, retry_token: str) -> Any:
    """A sync backup of the volume: the version its tags say it holds, whose it is, and ``extra``."""
    tags = {k: v for k, v in volume_tags.items() if k in KEPT_TAGS}
    tags.update({**extra, TAG_SYNC_OF: volume_id})
    return cloud.with_backoff(clients.blockstorage.create_volume_backup, models.CreateVolumeBackupDetails(
        volume_id=volume_id, display_name=name[:255], type="INCREMENTAL", freeform_tags=tags),
        opc_retry_token=retry_token).data


def _before_sync_name(after_etag: str) -> str:
    return f"before sync to {after_etag.strip(chr(34))[:40]}"[:255]


def wait_backup(clients: cloud.Clients, backup_id: str, volume_id: str) -> Any:
    """The sync backup once AVAILABLE (a FAULTY one fails the sync before it writes)."""
    return cloud.wait_for_state(lambda: clients.blockstorage.get_volume_backup(backup_id).data, "AVAILABLE",
                                f"backup {backup_id} of volume {volume_id}", BACKUP_TIMEOUT,
                                failed=("FAULTY", "TERMINATING", "TERMINATED"))


@dataclass(frozen=True)
class RolledBack:
    """A rollback's account: the synced volume, the backup restored and the volume it became."""

    volume_id: str          # the synced volume, now rolled-back
    backup_id: str
    restored_volume_id: str  # holds ``etag`` again, tagged imported
    etag: str
    undone_etag: str         # the version the rolled-back sync wrote

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def rollback(clients: cloud.Clients, compartment_id: str, volume_id: str, retry_token: str,
             log: logging.Logger) -> RolledBack:
    """Restore the newest backup a sync of ``volume_id`` wrote after, as a new volume holding the version
    before that sync (a backup taken ahead of a sync that has not come is not one)."""
    volume = cloud.get_volume(clients, volume_id)
    tags = dict(volume.freeform_tags or {})
    backups = [b for b in sync_backups(clients, compartment_id, volume_id)
               if b.lifecycle_state == "AVAILABLE" and TAG_SYNC_AFTER in (b.freeform_tags or {})]
    if not backups:
        raise InvalidRequest("sync-backup-missing", f"volume {volume_id} has no AVAILABLE sync backup to roll back "
                             "to: it was never synced, or its backups were deleted")
    backup = backups[0]
    kept = dict(backup.freeform_tags or {})
    restored_tags = {**{k: v for k, v in kept.items() if k in KEPT_TAGS},
                     contract.TAG_STATE: contract.STATE_IMPORTED, TAG_ROLLED_BACK_FROM: volume_id}
    existing = cloud.find_volumes(clients, compartment_id, {TAG_ROLLED_BACK_FROM: volume_id})
    restored = next((v for v in existing if (v.freeform_tags or {}).get(contract.TAG_ETAG) == kept.get(
        contract.TAG_ETAG) and v.lifecycle_state in ("PROVISIONING", "RESTORING", "AVAILABLE")), None)
    if restored is None:
        restored = cloud.with_backoff(clients.blockstorage.create_volume, models.CreateVolumeDetails(
            compartment_id=compartment_id, availability_domain=volume.availability_domain,
            display_name=volume.display_name, size_in_gbs=max(volume.size_in_gbs, backup.size_in_gbs),
            vpus_per_gb=volume.vpus_per_gb, freeform_tags=restored_tags,
            source_details=models.VolumeSourceFromVolumeBackupDetails(id=backup.id)),
            opc_retry_token=retry_token).data
        log.info("restoring backup %s (version %s) of volume %s as volume %s", backup.id,
                 kept.get(contract.TAG_ETAG), volume_id, restored.id)
    cloud.wait_for_state(lambda: clients.blockstorage.get_volume(restored.id).data, "AVAILABLE",
                         f"volume {restored.id} restored from backup {backup.id}", BACKUP_TIMEOUT,
                         failed=("FAULTY", "TERMINATING", "TERMINATED"))
    # the synced volume is kept, out of the way of the next sync: no longer the object's import
    rolled = {k: v for k, v in tags.items() if k != contract.TAG_SOURCE}
    cloud.update_volume(clients, volume_id, freeform_tags={**rolled, contract.TAG_STATE: STATE_ROLLED_BACK})
    log.info("volume %s rolled back: volume %s holds version %s again", volume_id, restored.id,
             kept.get(contract.TAG_ETAG))
    return RolledBack(volume_id, backup.id, restored.id, kept.get(contract.TAG_ETAG, ""),
                      kept.get(TAG_SYNC_AFTER, ""))
