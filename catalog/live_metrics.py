"""The metric definitions a running server answers with, and how a changed file replaces them.

A server must never answer with definitions that `lakegate metrics validate` would reject for
reasons of their own: a file that does not parse, a locked version whose definition changed or
disappeared, a version that was never locked, a metric that does not compile. (Checks against the
live tables stay with `validate`, which CI runs: a server starts before its tables are read.)

- At start, `LiveMetrics.open` refuses an invalid file with a ConfigurationError naming every
  problem. The checks import the metric compiler, so that start-up stays fast they run once per
  content: the hash of the definitions and the lock that passed is kept in the state directory
  (`metrics.checked`), and a start with the same files only compares it.
- While serving, `catalog` looks at most once a second whether the files changed. A new version
  that passes the checks replaces the definitions; one that fails is not taken: the last valid
  definitions stay, the log says why (`metrics.reload_rejected`), and `rejected` holds the
  message until a valid file lands, for the audit record of every metric call meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import structlog

from lakegate.catalog.metric_definitions import (
    LOCK_FILE,
    METRICS_FILE,
    MetricsFiles,
    SemanticCatalog,
    locate_metrics,
    parse_semantic_catalog,
)
from lakegate.errors import ConfigurationError

__all__ = ["CHECKED_FILE", "LiveMetrics", "problems_of"]

log = structlog.get_logger(__name__)

#: In the state directory: the hash of the definitions and lock that last passed the checks.
CHECKED_FILE = "metrics.checked"
#: How often a metric call looks whether the files changed.
CHECK_INTERVAL_S = 1.0


def _content_hash(files: MetricsFiles) -> str:
    digest = hashlib.sha256()
    for part in (files.source, files.text, files.lock or ""):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def problems_of(files: MetricsFiles) -> tuple[SemanticCatalog | None, list[str]]:
    """The definitions in `files` and what is wrong with them on their own (no table is read):
    not parseable, not matching the lock, or not compiling. No problems: safe to serve."""
    from lakegate.catalog.metric_validation import check_compiles, check_lock, parse_lock

    try:
        catalog = parse_semantic_catalog(files.text, source=files.source)
    except ConfigurationError as exc:
        return None, [str(exc)]
    try:
        lock = parse_lock(files.lock, source=files.lock_source) if files.lock is not None else None
    except ConfigurationError as exc:
        return catalog, [str(exc)]
    problems = check_lock(catalog, lock, file=files.source, lock_file=files.lock_source)
    problems += check_compiles(catalog, file=files.source)[0]
    return catalog, [str(problem) for problem in problems]


def _refusal(problems: list[str]) -> ConfigurationError:
    listed = "\n".join(f"  - {problem}" for problem in problems)
    return ConfigurationError(
        f"the metric definitions cannot be served:\n{listed}\n"
        "Fix them (`lakegate metrics validate` checks, `lakegate metrics lock` records new versions), then start again."
    )


class LiveMetrics:
    """The metric definitions in force, replaced when the files change to a valid version."""

    def __init__(self, project: Path, files: MetricsFiles, catalog: SemanticCatalog) -> None:
        self._project = project
        self._catalog = catalog
        self._hash = _content_hash(files)
        self._stamp = self._file_stamp()
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()
        self.rejected: str | None = None

    @classmethod
    def open(cls, project: Path, state_dir: Path, *, drafts: bool = False) -> LiveMetrics:
        """The project's definitions, checked (or known checked) before anything is served; with
        `drafts`, only parsed (versions not locked yet are served: `lakegate metrics diff`).

        Raises:
            ConfigurationError: the definitions are invalid (the message lists every problem).
        """
        files = locate_metrics(project)
        if drafts:
            return cls(project, files, parse_semantic_catalog(files.text, source=files.source))
        content = _content_hash(files)
        checked = state_dir / CHECKED_FILE
        if checked.is_file() and checked.read_text(encoding="utf-8").strip() == content:
            return cls(project, files, parse_semantic_catalog(files.text, source=files.source))
        catalog, problems = problems_of(files)
        if problems or catalog is None:
            raise _refusal(problems)
        state_dir.mkdir(parents=True, exist_ok=True)
        checked.write_text(content + "\n", encoding="utf-8")
        return cls(project, files, catalog)

    def _file_stamp(self) -> tuple[float, ...]:
        paths = (self._project / METRICS_FILE, self._project / LOCK_FILE)
        return tuple(path.stat().st_mtime_ns if path.exists() else -1.0 for path in paths)

    @property
    def catalog(self) -> SemanticCatalog:
        """The definitions to answer with now (a changed file is looked at first, at most once a second)."""
        now = time.monotonic()
        if now - self._checked_at >= CHECK_INTERVAL_S:
            with self._lock:
                if now - self._checked_at >= CHECK_INTERVAL_S:
                    self._checked_at = now
                    if (stamp := self._file_stamp()) != self._stamp:
                        self._stamp = stamp
                        self._reload()
        return self._catalog

    def _reload(self) -> None:
        try:
            files = locate_metrics(self._project)
        except OSError as exc:
            self._reject([f"the metric definitions cannot be read: {exc}"])
            return
        content = _content_hash(files)
        if content == self._hash:
            return  # touched, not changed
        catalog, problems = problems_of(files)
        if problems or catalog is None:
            self._reject(problems)
            return
        self._catalog, self._hash, self.rejected = catalog, content, None
        log.info("metrics.reloaded", metrics=len({m.name for m in catalog.metrics}), versions=len(catalog.metrics))

    def _reject(self, problems: list[str]) -> None:
        log.error("metrics.reload_rejected", problems=problems, kept="the last valid definitions")
        # For audit records: files named relative to the project, never by a server path.
        self.rejected = "; ".join(problems).replace(f"{self._project}{os.sep}", "")
