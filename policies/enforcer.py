"""The fail-closed wrapper around Casbin that every lakegate decision goes through.

- Deny by default: a subject with no matching allow rule is denied.
- Fail closed: an exception while loading or deciding is a denial, never an allow. pycasbin's
  enforcer allows everything when it is disabled; this wrapper never disables it and refuses to
  answer if something else did.
- Every decision carries the rule that decided it (the deny rule, or the first allow rule), and the
  version (content hash) of the policy set that was in force.
- Hot reload: the model and policy files are re-read when they change on disk.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import casbin
import structlog

from policies.row_filters import ROW_FILTER_FILE, RowFilter, RowFilterSet, load_row_filters

__all__ = ["Decision", "PolicyEnforcer", "PolicyFiles", "policy_files"]

log = structlog.get_logger(__name__)

MODEL_FILE = "model.conf"
POLICY_FILE = "policy.csv"
_ALLOW_ONLY_EFFECT = "some(where (p_eft == allow))"


@dataclass(frozen=True)
class Decision:
    """The answer to "may SUBJECT do ACTION on OBJECT?", with why."""

    allowed: bool
    subject: str
    obj: str
    action: str
    rule: tuple[str, ...] = ()
    reason: str = ""

    @property
    def rule_text(self) -> str:
        return ", ".join(self.rule) if self.rule else "no matching allow rule (deny by default)"


@dataclass(frozen=True)
class PolicyFiles:
    """Where the policy set comes from: the project's policies/, else the packaged defaults.

    The Casbin model and policy, and the row filters (optional: no file, no row filters).
    """

    model: Path
    policy: Path
    row_filters: Path | None = None

    def _paths(self) -> list[Path]:
        return [self.model, self.policy, *([self.row_filters] if self.row_filters else [])]

    def content_hash(self, extra: Iterable[str] = ()) -> str:
        digest = hashlib.sha256()
        for path in self._paths():
            digest.update(path.read_bytes() if path.is_file() else b"")
        for line in extra:
            digest.update(line.encode())
        return digest.hexdigest()[:16]

    def mtimes(self) -> tuple[float, ...]:
        return tuple(path.stat().st_mtime if path.exists() else 0.0 for path in self._paths())


def policy_files(project: Path) -> PolicyFiles:
    """The policy files for a project: `<project>/policies/*` when present, else the packaged defaults."""
    packaged = Path(str(resources.files("policies")))
    local = project / "policies"
    # A project with its own policy.csv owns its row filters too: the packaged demo filters must
    # not narrow someone else's data.
    own_policy = (local / POLICY_FILE).is_file()
    return PolicyFiles(
        model=local / MODEL_FILE if (local / MODEL_FILE).is_file() else packaged / MODEL_FILE,
        policy=local / POLICY_FILE if own_policy else packaged / POLICY_FILE,
        row_filters=local / ROW_FILTER_FILE if own_policy else packaged / ROW_FILTER_FILE,
    )


@dataclass
class _Loaded:
    decider: casbin.Enforcer | None
    explainer: casbin.Enforcer | None
    version: str
    mtimes: tuple[float, ...]
    row_filters: RowFilterSet = field(default_factory=RowFilterSet)
    error: str | None = None
    cache: dict[tuple[str, str, str], Decision] = field(default_factory=dict)


class PolicyEnforcer:
    """Decisions over a policy set, reloaded when its files change.

    `resource_groups` maps a resource to the tag groups it belongs to (for g2 lines), e.g.
    {"sales.customers.email": ("tag:pii",)}; it comes from the catalog definitions.
    """

    def __init__(
        self,
        files: PolicyFiles,
        resource_groups: Mapping[str, Iterable[str]] | None = None,
        *,
        reload_interval_s: float = 1.0,
    ) -> None:
        self._files = files
        self._groups = [(obj, group) for obj, groups in (resource_groups or {}).items() for group in groups]
        self._reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._loaded = self._load()

    @property
    def files(self) -> PolicyFiles:
        return self._files

    @property
    def version(self) -> str:
        return self._current().version

    @property
    def load_error(self) -> str | None:
        return self._current().error

    def decide(self, subject: str, obj: str, action: str) -> Decision:
        """Decide one request. Never raises: any failure is a denial whose reason says why."""
        loaded = self._current()
        key = (subject, obj, action)
        cached = loaded.cache.get(key)
        if cached is not None:
            return cached
        decision = self._decide(loaded, subject, obj, action)
        loaded.cache[key] = decision
        return decision

    def row_filters(self, subject: str, dataset: str) -> list[RowFilter]:
        """The row filters on `dataset` for `subject`: its own and those of every role it holds."""
        loaded = self._current()
        subjects = {subject, *self.roles_for(subject)}
        return loaded.row_filters.for_subjects(subjects, dataset)

    def roles_for(self, subject: str) -> tuple[str, ...]:
        """Every role the subject holds, directly or through inheritance."""
        loaded = self._current()
        if loaded.decider is None:
            return ()
        try:
            return tuple(sorted(loaded.decider.get_implicit_roles_for_user(subject)))
        except Exception:  # a broken role graph grants nothing
            log.exception("policy.roles_failed", subject=subject)
            return ()

    def reload_if_changed(self) -> bool:
        """Re-read the policy files if they changed; returns whether a new set was loaded."""
        with self._lock:
            self._checked_at = time.monotonic()
            try:
                changed = self._files.mtimes() != self._loaded.mtimes
            except OSError:
                changed = True
            if changed:
                self._loaded = self._load()
            return changed

    def _current(self) -> _Loaded:
        if time.monotonic() - self._checked_at >= self._reload_interval_s:
            self.reload_if_changed()
        return self._loaded

    def _load(self) -> _Loaded:
        try:
            mtimes = self._files.mtimes()
            version = self._files.content_hash(f"{obj}>{group}" for obj, group in self._groups)
            decider = self._enforcer(explain_allows=False)
            explainer = self._enforcer(explain_allows=True)
            row_filters = load_row_filters(self._files.row_filters)
        except Exception as exc:
            # Fail closed: an unreadable or invalid policy set denies everything until it is fixed.
            log.error("policy.load_failed", error=str(exc), model=str(self._files.model))
            return _Loaded(None, None, "invalid", (), error=f"{type(exc).__name__}: {exc}")
        log.info("policy.loaded", version=version)
        return _Loaded(decider, explainer, version, mtimes, row_filters)

    def _enforcer(self, *, explain_allows: bool) -> casbin.Enforcer:
        model = casbin.Enforcer.new_model(path=str(self._files.model))
        if explain_allows:
            # Under deny-overrides, pycasbin names only the deny rule; an allow-only copy of the
            # model names the allow rule that matched, so every decision can say why.
            model["e"]["e"].value = _ALLOW_ONLY_EFFECT
        enforcer = casbin.Enforcer(model, casbin.FileAdapter(str(self._files.policy)))
        for obj, group in self._groups:
            enforcer.add_named_grouping_policy("g2", obj, group)
        return enforcer

    def _decide(self, loaded: _Loaded, subject: str, obj: str, action: str) -> Decision:
        if loaded.decider is None or loaded.explainer is None:
            return Decision(False, subject, obj, action, reason=f"policy set failed to load: {loaded.error}")
        if not loaded.decider.enabled:
            return Decision(False, subject, obj, action, reason="policy enforcement was disabled")
        try:
            allowed, rule = loaded.decider.enforce_ex(subject, obj, action)
            if allowed and not rule:
                _, rule = loaded.explainer.enforce_ex(subject, obj, action)
        except Exception as exc:
            log.exception("policy.decide_failed", subject=subject, obj=obj, action=action)
            return Decision(False, subject, obj, action, reason=f"policy evaluation failed: {exc}")
        reason = "allowed by rule" if allowed else ("denied by rule" if rule else "no rule allows it")
        return Decision(bool(allowed), subject, obj, action, tuple(str(part) for part in rule), reason)
