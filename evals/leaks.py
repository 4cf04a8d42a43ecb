"""What no tool output and no audit record may carry: a key, a server path.

The agent evals and the security tests scan everything an agent or a reviewer gets back (text,
structured content, plans, errors, column names, audit records) with `Forbidden.found`. What the
agent itself sent may come back (an error quoting its SQL), so text of its own arguments is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KEY_FILES", "Forbidden"]

#: Secrets under a state directory, by what they are: the hash mask's key, the key of the audit
#: record's redaction hashes, and the private key that signs audit checkpoints.
KEY_FILES = {"mask key": "mask.key", "audit key": "audit.key", "checkpoint key": "audit-checkpoint.key"}


@dataclass
class Forbidden:
    """Strings that must not appear in an output, read from a state directory and a project."""

    home: Path
    paths: dict[str, str] = field(default_factory=dict)
    _keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, home: Path, *extra_paths: Path) -> Forbidden:
        paths = {"state directory": str(home.resolve())}
        for path in extra_paths:
            paths[f"server path {path.name}"] = str(path.resolve())
        return cls(home, paths)

    def _needles(self) -> dict[str, str]:
        # Keys are made on first use: look again until each exists.
        for label, name in KEY_FILES.items():
            if label not in self._keys and (self.home / name).is_file():
                # A PEM file's secret is its base64 body: its longest line stands for it.
                self._keys[label] = max((self.home / name).read_text().split(), key=len)
        return {**self.paths, **self._keys}

    def found(self, output: Any, sent: Any = None) -> list[str]:
        """What `output` (text, or anything JSON can hold) carries that it must not: labels, not the
        secrets themselves. A needle that is in `sent` (the caller's own arguments) is allowed."""
        text = output if isinstance(output, str) else json.dumps(output, default=str)
        own = "" if sent is None else sent if isinstance(sent, str) else json.dumps(sent, default=str)
        needles = self._needles().items()
        return sorted(label for label, needle in needles if needle and needle in text and needle not in own)
