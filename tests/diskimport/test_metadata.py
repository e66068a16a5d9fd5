"""Validation of import options from parameters and object metadata."""

from __future__ import annotations

import pytest

from diskimport.metadata import ImportOptions, InvalidRequest, merge, parse_options
from diskimport.naming import import_id, volume_display_name


@pytest.mark.parametrize("values,message", [
    ({"ad_number": "two"}, "ad_number must be a whole number"),
    ({"ad_number": "4"}, "ad_number must be 1 to 3"),
    ({"ad_number": "0"}, "ad_number must be 1 to 3"),
    ({"vpus": "15"}, "vpus must be 0, 10, 20"),
    ({"display_name": "bad\nname"}, "display_name"),
    ({"backup_policy": "gold; rm -rf /"}, "backup_policy"),
    ({"format": "iso"}, "format must be one of"),
])
def test_bad_option_is_refused_naming_it(values, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_options(values, ad_count=3)


def test_good_options_parse_and_parameters_win_over_metadata():
    meta = parse_options({"ad_number": " 2 ", "vpus": "20", "display_name": "web01", "format": "vmdk"}, ad_count=3)
    assert meta == ImportOptions(2, "web01", None, 20, "vmdk")
    params = parse_options({"ad_number": 3, "vpus": None})
    assert merge(params, meta) == ImportOptions(3, "web01", None, 20, "vmdk")


def test_import_id_is_stable_per_object_version():
    a = import_id("ns", "b", "disk.qcow2", "etag-1")
    assert a == import_id("ns", "b", "disk.qcow2", "etag-1")
    assert a != import_id("ns", "b", "disk.qcow2", "etag-2")


def test_volume_name_template():
    assert volume_display_name("{stem}", "team/web01.vmdk", "e") == "web01"
    assert volume_display_name("import-{stem}-{etag}", "x.qcow2", "e1") == "import-x-e1"
    with pytest.raises(ValueError, match="template"):
        volume_display_name("{nope}", "x", "e")
