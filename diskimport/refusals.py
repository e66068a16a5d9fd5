"""Every refusal code a user can meet, each defined once: the class that refuses with it, where
it arises, what it means and what to do about it.

A refusal (:class:`~diskimport.contract.Refusal`) carries a stable ``code`` that programs and
people act on, so the codes are a public interface: this module is their one list.
``docs/refusals.md`` is written from it (``python -m diskimport.refusals docs/refusals.md``), and
``tests/test_refusal_codes.py`` reads the product's source to hold the three together: a code
raised but not listed here, one listed here that nothing raises, or one missing from the page
fails it.

Standard library only and importing nothing of the project, so whatever uses the contract can
read the codes without Prefect or the OCI SDK. The upload function's image holds
``contract.py`` alone (:mod:`function_trigger.build`), so ``contract.py`` does not import this
module: the function answers with the codes, it does not need their descriptions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# Where a refusal arises, in the order an import meets them -> the page's section title.
STAGES = {
    "upload function": "The upload function",
    "request": "The request: flow parameters, object metadata, configuration",
    "image header": "The image, read from its head and tail before anything is created",
    "machine": "A machine: an OVA, an OVF with its disks, a machine manifest",
    "worker VM": "On the worker VM, as the image is written and checked",
    "boot": "Booting an imported machine",
    "export": "Exporting a volume or a machine to Object Storage",
    "copy": "Copying volumes to another region",
}


@dataclass(frozen=True)
class RefusalCode:
    code: str
    refused_by: str | None  # the Refusal subclass raised; None: the upload function's answer, no exception
    where: tuple[str, ...]  # keys of STAGES, the first where it mostly arises
    meaning: str            # what was wrong, in the user's terms
    remedy: str             # what the user can do about it


def _index(codes: tuple[RefusalCode, ...]) -> dict[str, RefusalCode]:
    index: dict[str, RefusalCode] = {}
    for entry in codes:
        if entry.code in index:
            raise ValueError(f"refusal code {entry.code!r} is defined twice")
        unknown = [w for w in entry.where if w not in STAGES]
        if unknown or not entry.where:
            raise ValueError(f"refusal code {entry.code!r}: where {entry.where!r} is not among {list(STAGES)}")
        index[entry.code] = entry
    return index


_OPTION = ("request", "upload function")  # flow parameters, and the upload's opc-meta-* metadata the function checks

CODES = _index((
    # -- the upload function ------------------------------------------------------------------
    RefusalCode("invalid-event", "EventRefused", ("upload function",),
                "The function received an event that is not a JSON object, or lacks its type, data or object "
                "names.",
                "Point the Events rule at the function with Object Storage object events, unchanged."),
    RefusalCode("object-gone", None, ("upload function",),
                "The object the event names was deleted before the function read it.",
                "Nothing to import; upload the object again if it should be imported."),
    RefusalCode("no-etag", None, ("upload function",),
                "Neither the event nor the object's metadata carries an ETag, so no object version can be named.",
                "Upload the object again; if it recurs, check that the bucket emits object events."),

    # -- the request ----------------------------------------------------------------------------
    RefusalCode("object-not-found", "InvalidRequest", ("request",),
                "The object is not in the bucket: the namespace, bucket or name is wrong, or it was deleted.",
                "Check the namespace, bucket and object name, or upload the object."),
    RefusalCode("object-changed", "InvalidRequest", ("request",),
                "The object was overwritten: its ETag is no longer the one the import was started for.",
                "Nothing to do: the new upload's own event imports the new version."),
    RefusalCode("not-a-machine", "InvalidRequest", ("request",),
                "A machine import was asked for an object that is not an .ova, .ovf or .machine.json.",
                "Import a single disk image with the disk import, or name the machine's .ova, .ovf or "
                ".machine.json object."),
    RefusalCode("invalid-ad-number", "InvalidRequest", _OPTION,
                "ad_number (opc-meta-ad-number) is not a whole number from 1 to the region's count of "
                "availability domains.",
                "Give a number in that range, or leave it out."),
    RefusalCode("invalid-vpus", "InvalidRequest", _OPTION,
                "vpus (opc-meta-vpus) is not 0, 10, 20, or 30 to 120 in steps of 10.",
                "Give one of those performance levels, or leave it out."),
    RefusalCode("invalid-display-name", "InvalidRequest", _OPTION,
                "display_name (opc-meta-display-name) is over 255 characters or holds control characters.",
                "Give a shorter, printable name, or leave it out."),
    RefusalCode("invalid-backup-policy", "InvalidRequest", _OPTION,
                "backup_policy (opc-meta-backup-policy) is not a policy name or OCID.",
                "Give gold, silver, bronze or a backup policy's OCID, or leave it out."),
    RefusalCode("unknown-backup-policy", "InvalidRequest", ("request",),
                "No backup policy of that name exists in the region.",
                "Use one of the names the message lists, or the policy's OCID."),
    RefusalCode("invalid-format", "InvalidRequest", _OPTION,
                "format (opc-meta-format) is not one of qcow2, qcow, vmdk, vhd, vpc, vhdx, vdi, raw, img.",
                "Set one of those, or leave it out so that the name's suffix tells."),
    RefusalCode("invalid-bootable", "InvalidRequest", ("upload function",),
                "opc-meta-bootable on a machine upload is not true or false (yes/no, 1/0, on/off).",
                "Set true or false, or leave it out to take the machine deployment's default."),
    RefusalCode("invalid-launch", "InvalidRequest", ("upload function",),
                "opc-meta-launch on a machine upload is not true or false, or is true while "
                "opc-meta-bootable is false (only a bootable machine is launched).",
                "Set true or false (and bootable true to launch), or leave it out."),
    RefusalCode("invalid-adapt-guest", "InvalidRequest", ("upload function", "request"),
                "adapt_guest (opc-meta-adapt_guest on a machine upload, or the flow's parameter) is not auto or off.",
                "Set auto (adapt a Linux guest to OCI, the default) or off, or leave it out."),
    RefusalCode("invalid-sync", "InvalidRequest", _OPTION,
                "sync (opc-meta-sync, or the flow's parameter) is not true or false.",
                "Set true (update the volume of the object's earlier import in place) or false (a new "
                "volume), or leave it out for the settings' sync_volumes."),
    RefusalCode("sync-older-version", "InvalidRequest", ("request",),
                "A sync was asked for, and the volume of the object's earlier import holds a version uploaded "
                "after this one: a sync never writes an older version over a newer one.",
                "Upload the version wanted again (it is then the newest), or import it onto a new volume "
                "with sync false."),
    RefusalCode("sync-volume-in-use", "InvalidRequest", ("request",),
                "A sync was asked for, and the volume of the object's earlier import is attached to an instance "
                "that is not stopped, or was cut over to a machine (after a cutover, the machine holds the truth); "
                "or a cutover was asked for a volume cut over already.",
                "Stop the instance or detach the volume, or import onto a new volume with sync false."),
    RefusalCode("sync-backup-missing", "InvalidRequest", ("request",),
                "A rollback was asked for a volume without an AVAILABLE sync backup, or a sync for a volume a "
                "failed sync left whose backup is gone (it could not be rolled back).",
                "Name a volume a sync wrote (its backups are tagged import-sync-after), or import onto a new "
                "volume with sync false."),
    RefusalCode("cutover-not-synced", "InvalidRequest", ("request",),
                "A rehearsal or cutover was asked for an object whose newest upload is on no sync volume: it was "
                "never imported with sync, its sync failed, or (a cutover waits for a sync that runs) its sync did "
                "not end in time.",
                "Push the disk with sync (oci-disk-delta push) and wait for its run to end, then ask again."),
    RefusalCode("not-cut-over", "InvalidRequest", ("request",),
                "A cutover rollback was asked for an object none of whose sync volumes was cut over.",
                "Name the object a cutover ran for (its sync volume is tagged import-cutover-to)."),
    RefusalCode("delta-base-mismatch", "InvalidRequest", ("request", "worker VM"),
                "A delta upload (a qcow2 whose backing file is oci-import:<import id>) refers to an import that "
                "is not the one the object's volume holds (another version was synced since, the volume was "
                "rolled back, the object was never imported with sync), or sync was turned off or force asked "
                "for it, or that import's manifest is gone or is not the one its volume was tagged with.",
                "Push again: the client computes the delta from the object's current version's import, or "
                "uploads the whole disk with --full."),
    RefusalCode("delta-manifest-missing", "InvalidRequest", ("request",),
                "A delta upload does not name its manifest (opc-meta-delta-manifest, a SHA-256), or the manifest "
                "object .oci-import/uploads/<source id>/<sha256>.manifest is missing or unreadable, or describes another disk "
                "size.",
                "Push with oci-disk-delta, which uploads the manifest before the image."),
    RefusalCode("delta-manifest-mismatch", "InvalidRequest", ("worker VM",),
                "After a delta was applied, the volume does not hold the disk the client's manifest describes: "
                "a block read back, or one the delta left alone, has another digest (the message names the "
                "first). The volume is kept, tagged failed, and its sync backup restores the version before.",
                "Push again with --full, or roll the volume back with rollback-sync."),
    RefusalCode("invalid-virtual-size", "InvalidRequest", _OPTION,
                "virtual_size (opc-meta-virtual-size) is not a whole number of bytes from 1 to the maximum "
                "virtual size.",
                "Give the raw disk's size in bytes, or leave it out."),
    RefusalCode("invalid-setting", "InvalidRequest", ("request",),
                "A block's setting is unusable: the ImportSettings block's volume_name_template cannot make "
                "a name for this object, or a WorkerShape, ImportSettings or TargetMachine field that names a "
                "resource (compartment_id, subnet_id, image_id) is not the OCID of that kind of resource.",
                "Fix the block field the message names (volume_name_template's fields are in the block's "
                "description), or give display_name."),
    RefusalCode("no-target-machine", "InvalidRequest", ("request",),
                "A bootable machine import was asked for without a TargetMachine block.",
                "Create the TargetMachine block (compartment, subnet, shape, platform image), or import the "
                "machine's disks without booting it."),

    # -- the image, from its head and tail ----------------------------------------------------
    RefusalCode("empty", "ImageRejected", ("image header",),
                "The object, or the data inside its compression or tar, is 0 bytes.",
                "Upload the image again: the upload was probably cut short."),
    RefusalCode("multiple-formats", "ImageRejected", ("image header",),
                "The header matches more than one image format, so which one is meant cannot be told.",
                "Convert it with qemu-img convert -O qcow2 (or raw) and upload that."),
    RefusalCode("incomplete-header", "ImageRejected", ("image header",),
                "An image format's signature is there, but its header could not be read whole.",
                "Check that the file is whole; convert it with qemu-img convert -O qcow2 and upload that."),
    RefusalCode("unsupported-format", "ImageRejected", ("image header",),
                "The image is in a format that is not imported (QED, ISO).",
                "Convert it to qcow2, vmdk, vhd, vhdx, vdi or raw with qemu-img convert."),
    RefusalCode("encrypted", "ImageRejected", ("image header",),
                "The image is LUKS-encrypted: an encrypted disk cannot be checked.",
                "Decrypt it and upload the plain disk."),
    RefusalCode("unreadable-header", "ImageRejected", ("image header",),
                "The format's header could not be parsed for its safety checks.",
                "Check that the file is whole; convert it with qemu-img convert and upload that."),
    RefusalCode("claimed-format-mismatch", "ImageRejected", ("image header",),
                "The name's suffix or opc-meta-format claims one format, the content is another.",
                "Rename the object with the right suffix, or set opc-meta-format to the real format."),
    RefusalCode("zero-virtual-size", "ImageRejected", ("image header",),
                "The image says its disk is 0 bytes.",
                "Upload the right image: this one holds no disk."),
    RefusalCode("too-large", "ImageRejected", ("image header",),
                "The virtual size is over ImportSettings' max_virtual_size_bytes or the largest block volume "
                "(32 TiB).",
                "Shrink the disk before exporting it, or raise max_virtual_size_bytes (up to 32 TiB)."),
    RefusalCode("safety-check", "ImageRejected", ("image header",),
                "oslo.utils' safety checks failed without naming the check.",
                "Convert the image with qemu-img convert -O qcow2 and upload that."),
    RefusalCode("backing_file", "ImageRejected", ("image header", "worker VM"),
                "The image names a backing file: it holds only the changes over another image, which is not "
                "uploaded (oslo's check, and qemu-img's on the worker).",
                "Flatten it (qemu-img convert -O qcow2 into a new file) and upload the whole image."),
    RefusalCode("data_file", "ImageRejected", ("image header", "worker VM"),
                "The qcow2 keeps its data in an external file, which is not uploaded (oslo's check, and "
                "qemu-img's on the worker).",
                "Convert it to a self-contained qcow2 with qemu-img convert -O qcow2."),
    RefusalCode("unknown_features", "ImageRejected", ("image header",),
                "The qcow2 header sets feature bits that oslo.utils does not know (oslo's check).",
                "Convert it with qemu-img convert -O qcow2 and upload that."),
    RefusalCode("descriptor", "ImageRejected", ("image header",),
                "The VMDK's descriptor is missing or unsafe: extents in other files, lines not understood, or a "
                "subformat other than monolithicSparse or streamOptimized (oslo's check).",
                "Convert it to one file: qemu-img convert -O vmdk -o subformat=streamOptimized, or -O qcow2."),
    RefusalCode("footer", "ImageRejected", ("image header",),
                "The streamOptimized VMDK's footer does not match its header (oslo's check).",
                "Export the VMDK again, or convert it with qemu-img convert -O qcow2."),
    RefusalCode("mbr", "ImageRejected", ("image header",),
                "The disk's partition table (MBR or GPT's protective MBR) is malformed (oslo's check).",
                "Repair the partition table in the source machine, or check that the file is a disk image."),
    RefusalCode("vhd-footer-checksum", "ImageRejected", ("image header",),
                "The fixed VHD's footer at the object's end fails its checksum.",
                "The file is damaged: export it again."),
    RefusalCode("vhd-not-fixed", "ImageRejected", ("image header",),
                "The VHD footer at the end is not a whole fixed VHD's (a dynamic VHD whose head is gone, or "
                "another disk type).",
                "Upload the whole VHD, or convert it to a fixed VHD or qcow2."),
    RefusalCode("vhd-differencing", "ImageRejected", ("image header",),
                "A differencing VHD holds only the changes over a parent disk, which is not uploaded.",
                "Merge it into its parent (Hyper-V's Edit Disk, or qemu-img convert) and upload the result."),
    RefusalCode("vhd-size-mismatch", "ImageRejected", ("image header",),
                "The fixed VHD's footer gives a size other than the object's length before it: the file was cut "
                "or appended to.",
                "Upload the VHD exactly as it was exported."),
    RefusalCode("nested-image", "ImageRejected", ("image header", "worker VM"),
                "The disk's data is itself an image (a qcow2 inside a fixed VHD, or a written disk that reads as "
                "an image).",
                "Upload the inner image itself, with its own suffix."),
    RefusalCode("decompression-failed", "ImageRejected", ("image header", "worker VM"),
                "The object does not decompress as its suffix says, is corrupt, or ends short of the size it "
                "recorded.",
                "Check that the suffix (.gz, .xz, .zst, .bz2) names the compression and the file is whole; "
                "compress it again."),
    RefusalCode("decompression-bomb", "ImageRejected", ("image header", "worker VM"),
                "The data decompresses to more than its recorded or declared size, or than the maximum virtual "
                "size.",
                "Check opc-meta-virtual-size and the file; compress the disk again."),
    RefusalCode("virtual-size-unknown", "ImageRejected", ("image header",),
                "The compression does not record the disk's size (gzip over 4 GiB, bzip2, zstd from a pipe), "
                "so no volume can be sized.",
                "Set opc-meta-virtual-size to a raw disk's size in bytes, or compress with xz (or zstd from a "
                "file)."),
    RefusalCode("virtual-size-mismatch", "ImageRejected", ("image header",),
                "opc-meta-virtual-size disagrees with the size the compression or the image's header records.",
                "Correct opc-meta-virtual-size, or leave it out."),
    RefusalCode("tar-not-one-image", "ImageRejected", ("image header", "worker VM"),
                "The tar does not hold exactly one regular file (none, several, links, devices, sparse members, "
                "or a damaged header).",
                "Pack exactly one disk image in the tar, or upload the image alone."),

    # -- a machine ------------------------------------------------------------------------------
    RefusalCode("ova-malformed", "ImageRejected", ("machine",),
                "The OVA's tar is damaged, holds a member twice or under an unsafe name, or does not hold "
                "exactly one .ovf descriptor.",
                "Export the OVA again from its hypervisor."),
    RefusalCode("ovf-invalid", "ImageRejected", ("machine",),
                "The OVF descriptor is not a well-formed OVF 1.x or 2.0 envelope of one machine with its disks "
                "and files (or is over 4 MiB, or declares a document type).",
                "Export the machine again, or correct the descriptor the message names."),
    RefusalCode("ovf-unsupported", "ImageRejected", ("machine",),
                "The descriptor asks for what is not imported: a disk without a file, a file split into chunks "
                "or compressed by the OVF, a collection of machines, or more than 32 disks.",
                "Export without chunking or OVF compression, one machine at a time, or list the disks in a "
                "machine manifest."),
    RefusalCode("ova-missing-file", "ImageRejected", ("machine",),
                "The descriptor names a disk file that is not in the OVA, or not beside the .ovf in the bucket.",
                "Upload the missing file beside the .ovf, or export the OVA again."),
    RefusalCode("ova-size-mismatch", "ImageRejected", ("machine",),
                "A disk file's size is not the one the descriptor gives.",
                "Upload the file whole, or export the machine again."),
    RefusalCode("ova-manifest-invalid", "ImageRejected", ("machine",),
                "The manifest (.mf) is not lines of 'SHA256(file)= digest' naming the package's files once "
                "each (or is over 1 MiB, or not UTF-8).",
                "Export the machine again, or leave the manifest out."),
    RefusalCode("ova-digest-mismatch", "ImageRejected", ("machine", "worker VM"),
                "A file's bytes do not match their digest in the manifest.",
                "The file was changed or damaged: export and upload the machine again."),
    RefusalCode("ova-capacity-mismatch", "ImageRejected", ("machine",),
                "A disk's image header gives a size other than the descriptor's capacity for it.",
                "Export the machine again so that its descriptor and disks agree."),
    RefusalCode("machine-manifest-invalid", "ImageRejected", ("machine",),
                "The .machine.json is not a JSON object of the schema (name, disks, firmware, shape, ocpus, "
                "memory_gbs), or is over 1 MiB.",
                "Correct the manifest as the message says."),

    # -- on the worker VM ---------------------------------------------------------------------
    RefusalCode("vmdk-stream-invalid", "ImageRejected", ("worker VM",),
                "The streamOptimized VMDK's grains or grain tables are not as a decoder can read them in order "
                "(overlapping, misplaced, or pointing where no grain was written).",
                "Convert it with qemu-img convert -O vmdk -o subformat=streamOptimized (or -O qcow2) and upload "
                "that."),
    RefusalCode("qemu-cannot-read", "ImageRejected", ("worker VM",),
                "qemu-img cannot open the image as the format its header said.",
                "Convert the image with qemu-img convert where it was made, and upload that."),
    RefusalCode("qemu-disagrees", "ImageRejected", ("worker VM",),
                "qemu-img reads another format or virtual size than the header inspection found.",
                "Convert the image with qemu-img convert and upload that."),
    RefusalCode("qemu-check-failed", "ImageRejected", ("worker VM",),
                "qemu-img check found corruption in the image.",
                "Repair it (qemu-img check -r all on a copy) or export it again."),
    RefusalCode("filesystem-errors", "FilesystemErrors", ("worker VM",),
                "A read-only check found errors in a filesystem of the written disk; the message names where.",
                "Repair the filesystem in the source machine (fsck, chkdsk) and export the disk again."),
    RefusalCode("unchecked-filesystems", "FilesystemErrors", ("worker VM",),
                "A filesystem or partition of the written disk could not be checked, and ImportSettings' "
                "unchecked_filesystems is \"fail\".",
                "Set unchecked_filesystems to \"allow\" to import such disks, or check the locations named."),

    # -- booting ------------------------------------------------------------------------------
    RefusalCode("machine-did-not-boot", "BootFailed", ("boot",),
                "The started machine did not show TargetMachine's boot_pattern on its console in time "
                "(boot_check \"require\"); it is stopped and its volumes are kept.",
                "Read its console history; check the firmware and the block's boot_pattern and "
                "boot_timeout_seconds."),

    RefusalCode("guest-adaptation-failed", "AdaptationFailed", ("boot",),
                "The Linux guest could not be adapted to OCI (its initramfs tool failed, a file could not be "
                "written, no initramfs tool was found); what the adaptation changed was put back and the "
                "volumes are kept as written, with the guest report.",
                "Read the guest's tool output in the message and the guest report; fix the guest at the "
                "source, or import with adapt_guest off and launch it in emulated mode."),

    # -- export -------------------------------------------------------------------------------
    RefusalCode("invalid-source", "InvalidRequest", ("export", "copy"),
                "Neither or both of volume_id and volume_group_id were given, one of them is not an OCID or "
                "is the OCID of another kind of resource (a volume's given as the group, a group's as the "
                "volume), the group has no volumes, or its volumes are in different availability domains.",
                "Give exactly one of volume_id (ocid1.volume. or ocid1.bootvolume.) and volume_group_id "
                "(ocid1.volumegroup.), a group of volumes in one availability domain."),
    RefusalCode("volume-not-found", "InvalidRequest", ("export", "copy"),
                "No volume has that OCID where the credentials look.",
                "Check the OCID, and the region and compartment of the credentials."),
    RefusalCode("volume-group-not-found", "InvalidRequest", ("export", "copy"),
                "No volume group has that OCID where the credentials look.",
                "Check the OCID, and the region and compartment of the credentials."),
    RefusalCode("bucket-not-found", "InvalidRequest", ("export",),
                "The bucket is not in the namespace, or the credentials cannot see it.",
                "Check the bucket's name and namespace, and that the credentials may use it."),
    RefusalCode("volume-not-available", "InvalidRequest", ("export", "copy"),
                "The volume is not AVAILABLE (provisioning, restoring, terminating).",
                "Wait until it is AVAILABLE and run again."),
    RefusalCode("volume-attached", "InvalidRequest", ("export",),
                "The volume is attached to an instance, so it would not export consistently.",
                "Stop the instance and detach the volume, then export."),
    RefusalCode("invalid-export-format", "InvalidRequest", ("export",),
                "format is not qcow2, vmdk, vhdx, vhd or raw, or compress was asked for another format than "
                "qcow2.",
                "Give one of those formats; compress with qcow2 only."),
    RefusalCode("invalid-object-name", "InvalidRequest", ("export",),
                "object_name or prefix does not make a valid object name (1 to 1024 printable characters), or "
                "object_name does not end in an image suffix.",
                "Give a name ending in the format's suffix (.qcow2, .vmdk, ...), so that it imports again."),
    RefusalCode("object-exists", "InvalidRequest", ("export",),
                "An object of that name is already in the bucket and was not written by this export.",
                "Choose another object_name or prefix, or pass overwrite."),
    RefusalCode("vhd-too-large", "InvalidRequest", ("export",),
                "A volume is larger than a VHD can hold (about 2040 GiB).",
                "Export it as vhdx, qcow2 or raw."),
    RefusalCode("iscsi-export-unsupported", "InvalidRequest", ("export",),
                "The WorkerShape block attaches volumes by iSCSI; exports attach them paravirtualized.",
                "Use a WorkerShape block with attachment_type paravirtualized."),
    RefusalCode("export-convert-failed", "ImageRejected", ("export",),
                "qemu-img convert of the volume failed, or the qcow2 it wrote is not one qemu-img writes.",
                "Read qemu-img's error in the message; an export as raw needs no conversion."),
    RefusalCode("worker-disk-full", "ImageRejected", ("export",),
                "The worker VM's disk ran out of space for the converted image.",
                "Give the WorkerShape block a larger boot_volume_size_gb, or export as raw (not staged)."),
    RefusalCode("export-inspection-mismatch", "ImageRejected", ("export",),
                "The exported object, read back as an import reads it, is not the format or size it should be.",
                "Run the export again; if it recurs, report it with the message."),

    # -- copy to another region ---------------------------------------------------------------
    RefusalCode("invalid-destination-region", "InvalidRequest", ("copy",),
                "The destination region is missing, is the source region, is not a region identifier, or "
                "does not answer.",
                "Give another region that the tenancy is subscribed to, by its identifier (eu-frankfurt-1)."),
    RefusalCode("invalid-compartment", "InvalidRequest", ("copy",),
                "compartment_id is not an OCID, or is the OCID of something else than a compartment or the "
                "tenancy.",
                "Give a compartment's OCID (ocid1.compartment.), or leave it out for the settings' compartment."),
    RefusalCode("invalid-availability-domain", "InvalidRequest", ("copy",),
                "The availability domain is not one of the destination region's.",
                "Give one of those the message lists, or leave it out."),
))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """``docs/refusals.md``: every code, by where it arises."""
    lines = [
        "# Refusal codes",
        "",
        "<!-- Written by `python -m diskimport.refusals docs/refusals.md` from diskimport/refusals.py;",
        "     edit the registry there, then write this page again. -->",
        "",
        "A refusal is an import, export or copy that is not done because of what was asked or what",
        "was uploaded. It is never retried: doing the same again fails the same way. Its code is",
        "stable (programs and dashboards may act on it); its message says what exactly was wrong and",
        "may change. A refused flow run fails with the state message `code: message`, and an import",
        "run also keeps an `import-refused` artifact with both. The upload function answers a refused",
        "event with `{\"decision\": \"refused\", \"code\": ...}`.",
        "",
        "oslo.utils' safety check names (`backing_file`, `mbr`, ...) are kept as oslo names them,",
        "with underscores. The class is the exception raised (`diskimport.errors`,",
        "`diskimport.contract`, `function_trigger.trigger`); a code a table lists under one stage",
        "may also arise at the stages its row names.",
        "",
    ]
    for stage, title in STAGES.items():
        rows = [c for c in CODES.values() if c.where[0] == stage]
        lines += [f"## {title}", "", "| Code | Class | When | What to do |", "| --- | --- | --- | --- |"]
        for c in sorted(rows, key=lambda c: c.code):
            also = f" Also: {', '.join(c.where[1:])}." if len(c.where) > 1 else ""
            refused_by = f"`{c.refused_by}`" if c.refused_by else "(the function's answer)"
            lines.append(f"| `{c.code}` | {refused_by} | {_cell(c.meaning)}{also} | {_cell(c.remedy)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m diskimport.refusals [PATH]``: write the page to PATH, or print it."""
    if len(argv) > 1:
        sys.stderr.write("usage: python -m diskimport.refusals [PATH]\n")
        return 2
    if argv:
        Path(argv[0]).write_text(markdown())
    else:
        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
