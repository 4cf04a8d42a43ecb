"""The budgets of one tool call's result, defined beside the tools that keep to them.

server/settings.py composes them into `Settings.limits` (`LAKEGATE_LIMITS__*`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LimitSettings"]


class LimitSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_rows: int = Field(default=200, ge=1, description="Most rows (or items) one tool call returns.")
    max_bytes: int = Field(default=64 * 1024, ge=1024, description="Most bytes of JSON one tool call returns.")
