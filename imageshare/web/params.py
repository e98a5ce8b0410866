"""Typed route parameters shared by the HTTP adapters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

# A row number in a path (inbox item, token): positive and within what SQL integers hold, so
# an absurd number is a 422 with the reason, never a database error.
RowId = Annotated[int, Path(ge=1, le=2**63 - 1, description="a row number")]
