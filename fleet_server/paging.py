"""What every list endpoint shares: unknown query parameters are refused by name, and lists
keyed by a name page the same way."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Depends, HTTPException, Request
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute


def known_filters(*names: str) -> Any:
    """A dependency refusing query parameters the endpoint does not know (`?regoin=us` would
    otherwise return everything, which reads as "the filter matched all")."""

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(names))
        if unknown:
            raise HTTPException(422, f"unknown filter(s): {', '.join(unknown)}; known: {', '.join(names)}")

    return Depends(check)


T = TypeVar("T")


def by_name(
    q: Select[T], column: InstrumentedAttribute[str], *, prefix: str | None, after: str | None, limit: int
) -> Select[T]:
    """`q` ordered by its name `column`, names starting with `prefix`, after the cursor `after`."""
    q = q.order_by(column).limit(limit)
    if prefix:
        q = q.where(column.startswith(prefix, autoescape=True))
    if after is not None:
        q = q.where(column > after)
    return q
