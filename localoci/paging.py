"""OCI list paging: ``limit`` and ``page`` in, ``opc-next-page`` out."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from .errors import invalid_parameter
from .http import Request, Response


def paged(request: Request, items: Iterable[dict[str, Any]], render: Callable[[dict[str, Any]], Any]) -> Response:
    items = list(items)
    try:
        limit = int(request.query.get("limit", 1000))
        start = int(request.query.get("page", 0))
    except ValueError:
        raise invalid_parameter("limit and page must be whole numbers.") from None
    if limit < 1 or start < 0:
        raise invalid_parameter("limit must be positive and page must not be negative.")
    page = items[start:start + limit]
    headers = {"opc-next-page": str(start + limit)} if start + limit < len(items) else {}
    return Response.json([render(item) for item in page], headers=headers)


def require(request: Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise invalid_parameter(f"{name} is required.")
    return value
