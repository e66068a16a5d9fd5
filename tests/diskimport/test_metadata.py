"""Validation of import options from parameters and object metadata."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from diskimport.contract import (IMAGE_SUFFIXES, MAX_VOLUME_BYTES, ImportOptions, InvalidRequest, Refusal,
                                 idempotency_key, merge, parse_options, split_name)
from diskimport.naming import import_id, volume_display_name


@pytest.mark.parametrize("values,code,message", [
    ({"ad_number": "two"}, "invalid-ad-number", "ad_number must be a whole number"),
    ({"ad_number": "4"}, "invalid-ad-number", "ad_number must be 1 to 3"),
    ({"ad_number": "0"}, "invalid-ad-number", "ad_number must be 1 to 3"),
    ({"vpus": "15"}, "invalid-vpus", "vpus must be 0, 10, 20"),
    ({"display_name": "bad\nname"}, "invalid-display-name", "display_name"),
    ({"backup_policy": "gold; rm -rf /"}, "invalid-backup-policy", "backup_policy"),
    ({"format": "iso"}, "invalid-format", "format must be one of"),
    ({"sync": "sometimes"}, "invalid-sync", "sync must be true or false"),
])
def test_bad_option_is_refused_with_its_code(values, code, message):
    with pytest.raises(InvalidRequest) as refused:
        parse_options(values, ad_count=3)
    assert refused.value.code == code
    assert str(refused.value) == f"{code}: {refused.value.message}" and message in refused.value.message


def test_a_refusal_keeps_its_code_through_pickling():
    refusal = InvalidRequest("invalid-vpus", "vpus must be 0, 10, 20 or 30 to 120 in steps of 10, not 15")
    again = pickle.loads(pickle.dumps(refusal))
    assert type(again) is InvalidRequest and isinstance(again, Refusal) and isinstance(again, ValueError)
    assert (again.code, again.message, str(again)) == (refusal.code, refusal.message, str(refusal))


def test_an_invalid_request_given_only_a_message_has_the_generic_code():
    assert InvalidRequest("object 'x' not found").code == "invalid-request"
    with pytest.raises(TypeError):
        Refusal("a message without a code")


def test_good_options_parse_and_parameters_win_over_metadata():
    meta = parse_options({"ad_number": " 2 ", "vpus": "20", "display_name": "web01", "format": "vmdk"}, ad_count=3)
    assert meta == ImportOptions(2, "web01", None, 20, "vmdk")
    params = parse_options({"ad_number": 3, "vpus": None})
    assert merge(params, meta) == ImportOptions(3, "web01", None, 20, "vmdk")
    synced = parse_options({"sync": "yes"})
    assert synced.sync is True and synced.as_parameters() == {"sync": True}
    assert merge(parse_options({"sync": False}), synced).sync is False and parse_options({}).sync is None


def test_import_id_is_stable_per_object_version():
    a = import_id("ns", "b", "disk.qcow2", "etag-1")
    assert a == import_id("ns", "b", "disk.qcow2", "etag-1")
    assert a != import_id("ns", "b", "disk.qcow2", "etag-2")


def test_import_id_hashes_the_idempotency_key_the_function_uses():
    key = idempotency_key("ns", "b", "dir/disk.qcow2", "etag-1")
    assert key == "ns/b/dir/disk.qcow2@etag-1"
    assert import_id("ns", "b", "dir/disk.qcow2", "etag-1") == hashlib.sha256(key.encode()).hexdigest()[:32]
    assert import_id("ns", "b", "disk.qcow2", "etag-1") == "b33730285bf87d9126559453125d5dbb"  # as before the move


def test_image_suffixes_are_the_format_names_plain_compressed_and_packed():
    assert IMAGE_SUFFIXES[:9] == (".qcow2", ".qcow", ".vmdk", ".vhd", ".vpc", ".vhdx", ".vdi", ".raw", ".img")
    for name in ("disk.raw.gz", "web.img.xz", "db.qcow2.zst", "old.vmdk.bz2", "vm.tar", "vm.tar.gz", "vm.tgz"):
        assert name.endswith(IMAGE_SUFFIXES), name
    for name in ("notes.txt.gz", "backup.gz", "disk.raw.lz4", "archive.zip"):
        assert not name.endswith(IMAGE_SUFFIXES), name


@pytest.mark.parametrize("name,expected", [
    ("disk.raw.gz", ("raw", "gzip")),
    ("web.img.xz", ("raw", "xz")),
    ("DB.QCOW2.ZST", ("qcow2", "zstd")),
    ("dir.d/old.vhd.bz2", ("vpc", "bzip2")),
    ("vm.tar", (None, "tar")),
    ("vm.tar.gz", (None, "tar.gz")),
    ("vm.tgz", (None, "tar.gz")),
    ("disk.qcow2", ("qcow2", None)),
    ("notes.txt.gz", (None, None)),
    ("noextension", (None, None)),
])
def test_a_name_splits_into_the_inner_format_claim_and_the_container(name, expected):
    assert split_name(name) == expected


def test_virtual_size_is_whole_positive_bytes_within_the_maximum():
    assert parse_options({"virtual-size": "8589934592"}).virtual_size == 8 * 1024 ** 3
    assert parse_options({"virtual_size": 512}, max_virtual_size=512).virtual_size == 512
    for bad in ("0", "-1", "1.5", "8G", str(MAX_VOLUME_BYTES + 1)):
        with pytest.raises(InvalidRequest) as refused:
            parse_options({"virtual-size": bad})
        assert refused.value.code == "invalid-virtual-size" and "virtual_size" in refused.value.message
    with pytest.raises(InvalidRequest, match="1 to 1024 bytes"):
        parse_options({"virtual-size": "2048"}, max_virtual_size=1024)
    assert merge(ImportOptions(virtual_size=None), ImportOptions(virtual_size=4096)).virtual_size == 4096
    assert "virtual_size" not in ImportOptions(vpus=10, virtual_size=4096).as_parameters()


def test_volume_name_template():
    assert volume_display_name("{stem}", "team/web01.vmdk", "e") == "web01"
    assert volume_display_name("import-{stem}-{etag}", "x.qcow2", "e1") == "import-x-e1"
    with pytest.raises(ValueError, match="template"):
        volume_display_name("{nope}", "x", "e")
