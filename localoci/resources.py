"""Helpers shared by the models of lifecycle-managed resources."""

from __future__ import annotations

from typing import Any

from .errors import not_found


def lookup(collection: dict[str, dict[str, Any]], resource_id: str, what: str) -> dict[str, Any]:
    resource = collection.get(resource_id)
    if resource is None:
        raise not_found(f"{what} {resource_id}")
    return resource


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record without its private fields (those starting with ``_``)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def matches(record: dict[str, Any], query: dict[str, str], fields: dict[str, str]) -> bool:
    """Whether ``record`` satisfies the list filters in ``query`` (query name -> record field)."""
    return all(query.get(q) in (None, "") or record.get(f) == query[q] for q, f in fields.items())
