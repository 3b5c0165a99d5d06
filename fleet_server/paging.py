"""What every list endpoint shares: unknown query parameters are refused by name."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, HTTPException, Request


def known_filters(*names: str) -> Any:
    """A dependency refusing query parameters the endpoint does not know (`?regoin=us` would
    otherwise return everything, which reads as "the filter matched all")."""

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(names))
        if unknown:
            raise HTTPException(422, f"unknown filter(s): {', '.join(unknown)}; known: {', '.join(names)}")

    return Depends(check)
