"""Reading the YAML files of the policy set (row filters, scan limits, redaction rules)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["read_policy_file"]

M = TypeVar("M", bound=BaseModel)


def read_policy_file(path: Path | None, model: type[M]) -> M | None:
    """The file at `path` validated as `model`; None when there is no path or no file there (an
    empty file is the model's defaults).

    Raises:
        ValueError: the file is not YAML or does not match the schema (the message says where).
    """
    if path is None or not path.is_file():
        return None
    try:
        return model.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
