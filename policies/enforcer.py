"""The fail-closed wrapper around Casbin that every lakegate decision goes through.

- Deny by default: a subject with no matching allow rule is denied.
- Fail closed: an exception while loading or deciding is a denial, never an allow. pycasbin's
  enforcer allows everything when it is disabled; this wrapper never disables it and refuses to
  answer if something else did.
- Every decision carries the rule that decided it (the deny rule, or the first allow rule), and the
  version (content hash) of the policy set that was in force.
- Hot reload: the model and policy files are re-read when they change on disk.
- The rules may come from a `RuleSource` instead of policy.csv (the production profile keeps them
  in PostgreSQL: policies/pg_policies.py). Its stamp is compared on every decision, so a change it
  reports is applied at once; while it cannot vouch that its rules are current, every decision is
  a denial.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import casbin
import structlog

from lakegate.errors import ConfigurationError
from lakegate.policies.approvals import APPROVALS_FILE, ApprovalRules, load_approvals
from lakegate.policies.column_review import COLUMN_REVIEW_FILE, ColumnReview, load_column_review
from lakegate.policies.quotas import QUOTAS_FILE, QuotaSet, load_quotas
from lakegate.policies.redaction import REDACTION_FILE, RedactionRules, load_redaction
from lakegate.policies.row_filters import ROW_FILTER_FILE, RowFilter, RowFilterSet, load_row_filters
from lakegate.policies.scan_limits import SCAN_LIMITS_FILE, ScanLimitSet, load_scan_limits

__all__ = ["Decision", "PolicyEnforcer", "PolicyFiles", "RuleSource", "noting_unavailable", "policy_files"]

log = structlog.get_logger(__name__)

MODEL_FILE = "model.conf"
POLICY_FILE = "policy.csv"
_ALLOW_ONLY_EFFECT = "some(where (p_eft == allow))"
#: pycasbin evaluations, one at a time in the whole process: they are not safe in concurrent
#: threads (measured: under load they returned wrong answers), and they parse matchers with
#: `ast.parse`, whose recursion check CPython 3.11 keeps per process, so two enforcers evaluating
#: at once (two replicas in one test process) failed with "AST constructor recursion depth mismatch".
_EVALUATING = threading.Lock()


@dataclass(frozen=True)
class Decision:
    """The answer to "may SUBJECT do ACTION on OBJECT?", with why."""

    allowed: bool
    subject: str
    obj: str
    action: str
    rule: tuple[str, ...] = ()
    reason: str = ""
    #: Denied because no policy answer could be had (a shared rule store unreachable or unreadable,
    #: or the evaluation failed), not because of any rule: the caller should retry, not ask for access.
    unavailable: bool = False

    @property
    def rule_text(self) -> str:
        return ", ".join(self.rule) if self.rule else "no matching allow rule (deny by default)"


#: Where the gate collects, for the call in progress, why decisions were denied as unavailable.
_unavailable: ContextVar[list[str] | None] = ContextVar("lakegate_policy_unavailable", default=None)


@contextmanager
def noting_unavailable() -> Iterator[list[str]]:
    """Collect the reasons of every decision denied as unavailable in this context (and the worker
    threads it starts, which share the list), so that a call built on such a denial can be answered
    "policy unavailable, retry" instead of blaming a rule, a column or a dataset."""
    reasons: list[str] = []
    token = _unavailable.set(reasons)
    try:
        yield reasons
    finally:
        _unavailable.reset(token)


def _noted(decision: Decision) -> Decision:
    if decision.unavailable and (reasons := _unavailable.get()) is not None:
        reasons.append(decision.reason)
    return decision


@dataclass(frozen=True)
class PolicyFiles:
    """Where the policy set comes from: the project's policies/, else the packaged defaults.

    The Casbin model and policy, the row filters (optional: no file, no row filters), the
    redaction rules of the audit log (optional: no file, the default rules), the scan limits and
    the quotas (optional: no file, no limits), and the approval rules (optional: no file, no write
    needs approval).
    """

    model: Path
    policy: Path
    row_filters: Path | None = None
    redaction: Path | None = None
    scan_limits: Path | None = None
    quotas: Path | None = None
    approvals: Path | None = None
    column_review: Path | None = None

    def _paths(self) -> list[Path]:
        optional = [
            path
            for path in (
                self.row_filters,
                self.redaction,
                self.scan_limits,
                self.quotas,
                self.approvals,
                self.column_review,
            )
            if path is not None
        ]
        return [self.model, self.policy, *optional]

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
    packaged = Path(str(resources.files("lakegate.policies")))
    local = project / "policies"
    # A project with its own policy.csv owns its row filters too: the packaged demo filters must
    # not narrow someone else's data.
    own_policy = (local / POLICY_FILE).is_file()
    return PolicyFiles(
        model=local / MODEL_FILE if (local / MODEL_FILE).is_file() else packaged / MODEL_FILE,
        policy=local / POLICY_FILE if own_policy else packaged / POLICY_FILE,
        row_filters=local / ROW_FILTER_FILE if own_policy else packaged / ROW_FILTER_FILE,
        # Owning a policy.csv does not drop redaction: without a file of its own, a project gets
        # the packaged rules (the safe direction is to hide more, not less).
        redaction=local / REDACTION_FILE if (local / REDACTION_FILE).is_file() else packaged / REDACTION_FILE,
        # Like the row filters: the demo's limits are for the demo's roles.
        scan_limits=local / SCAN_LIMITS_FILE if own_policy else packaged / SCAN_LIMITS_FILE,
        quotas=local / QUOTAS_FILE if own_policy else packaged / QUOTAS_FILE,
        approvals=local / APPROVALS_FILE if own_policy else packaged / APPROVALS_FILE,
        column_review=local / COLUMN_REVIEW_FILE if own_policy else packaged / COLUMN_REVIEW_FILE,
    )


class RuleSource(Protocol):
    """Where the Casbin rules (p and g lines) come from instead of the policy.csv file."""

    def snapshot(self) -> Any:
        """A Casbin adapter over one consistent read of the rules (both enforcers of a load use it).

        Raises:
            Exception: the rules cannot be read (the load fails and everything is denied).
        """
        ...

    def stamp(self) -> int:
        """A number that changes whenever the rules change; read on every decision, so no I/O."""
        ...

    def stale_reason(self) -> str | None:
        """Why the rules may be out of date (every decision is then denied), or None."""
        ...

    def close(self) -> None:
        """Stop watching for changes."""
        ...


@dataclass
class _Loaded:
    decider: casbin.Enforcer | None
    explainer: casbin.Enforcer | None
    version: str
    mtimes: tuple[float, ...]
    row_filters: RowFilterSet = field(default_factory=RowFilterSet)
    scan_limits: ScanLimitSet = field(default_factory=ScanLimitSet)
    quotas: QuotaSet = field(default_factory=QuotaSet)
    approvals: ApprovalRules = field(default_factory=ApprovalRules)
    review: ColumnReview = field(default_factory=ColumnReview)
    error: str | None = None
    # Until a policy set loads, nothing is known to be safe to log in clear.
    redaction: RedactionRules = field(default_factory=RedactionRules.fail_closed)
    cache: dict[tuple[str, str, str], Decision] = field(default_factory=dict)
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # subject -> roles, like `cache`
    stamp: int | None = None  # the rule source's stamp the rules were read at
    #: The load failed because the shared rule store could not be read (retry), not because the
    #: rules are wrong: its denials are "unavailable".
    outage: bool = False


class PolicyEnforcer:
    """Decisions over a policy set, reloaded when its files change.

    `resource_groups` maps a resource to the tag groups it belongs to (for g2 lines), e.g.
    {"sales.customers.email": ("tag:pii",)}; it comes from the catalog definitions.
    With `rules`, the p and g lines come from that source and `files.policy` is not read.
    """

    def __init__(
        self,
        files: PolicyFiles,
        resource_groups: Mapping[str, Iterable[str]] | None = None,
        *,
        reload_interval_s: float = 1.0,
        rules: RuleSource | None = None,
    ) -> None:
        self._files = files
        self._groups = [(obj, group) for obj, groups in (resource_groups or {}).items() for group in groups]
        self._tagged = frozenset(obj for obj, _ in self._groups)
        self._reload_interval_s = reload_interval_s
        self._rules = rules
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._loaded = self._load()

    @property
    def files(self) -> PolicyFiles:
        return self._files

    @property
    def tagged_columns(self) -> frozenset[str]:
        """The columns catalog/datasets.yaml tags (each counts as reviewed, policies/column_review.py)."""
        return self._tagged

    @property
    def column_review(self) -> ColumnReview:
        """Which columns are hidden until reviewed, and the reviewed ones (policies/column_review.py)."""
        return self._current().review

    @property
    def rule_source(self) -> RuleSource | None:
        """Where the rules come from when not from `files.policy`."""
        return self._rules

    @property
    def version(self) -> str:
        return self._current().version

    @property
    def load_error(self) -> str | None:
        return self._current().error

    def decide(self, subject: str, obj: str, action: str) -> Decision:
        """Decide one request. Never raises: any failure is a denial whose reason says why."""
        loaded = self._current()
        if self._rules is not None and (stale := self._rules.stale_reason()) is not None:
            return _noted(Decision(False, subject, obj, action, reason=stale, unavailable=True))
        key = (subject, obj, action)
        cached = loaded.cache.get(key)
        if cached is not None:
            return _noted(cached)
        decision = self._decide(loaded, subject, obj, action)
        if not decision.unavailable:  # a failure is not the policy's answer: ask again next time
            loaded.cache[key] = decision
        return _noted(decision)

    def row_filters(self, subject: str, dataset: str) -> list[RowFilter]:
        """The row filters on `dataset` for `subject`: its own and those of every role it holds."""
        loaded = self._current()
        subjects = {subject, *self.roles_for(subject)}
        return loaded.row_filters.for_subjects(subjects, dataset)

    @property
    def scan_limits(self) -> ScanLimitSet:
        """The scan limits in force (policies/scan_limits.py); none while the set is invalid."""
        return self._current().scan_limits

    @property
    def quotas(self) -> QuotaSet:
        """The quotas in force (policies/quotas.py); none while the set is invalid (which denies every call)."""
        return self._current().quotas

    @property
    def approvals(self) -> ApprovalRules:
        """Which writes a person must approve (policies/approvals.py); none while the set is invalid
        (which denies every write)."""
        return self._current().approvals

    @property
    def redaction(self) -> RedactionRules:
        """Which argument values the audit log holds only hashed; every value while the set is invalid."""
        return self._current().redaction

    def roles_for(self, subject: str) -> tuple[str, ...]:
        """Every role the subject holds, directly or through inheritance."""
        loaded = self._current()
        if loaded.decider is None:
            return ()
        if (known := loaded.roles.get(subject)) is not None:
            return known
        try:
            with _EVALUATING:
                roles = tuple(sorted(loaded.decider.get_implicit_roles_for_user(subject)))
        except Exception:  # a broken role graph grants nothing (and is asked again next time)
            log.exception("policy.roles_failed", subject=subject)
            return ()
        loaded.roles[subject] = roles
        return roles

    def reload_if_changed(self) -> bool:
        """Re-read the policy files if they changed; returns whether a new set was loaded."""
        with self._lock:
            self._checked_at = time.monotonic()
            try:
                changed = self._files.mtimes() != self._loaded.mtimes
            except OSError:
                changed = True
            changed = changed or self._stamp() != self._loaded.stamp
            if changed:
                self._loaded = self._load()
            return changed

    def close(self) -> None:
        """Stop watching the rule source (if any); decisions keep the rules last loaded."""
        if self._rules is not None:
            self._rules.close()

    def _stamp(self) -> int | None:
        return self._rules.stamp() if self._rules is not None else None

    def _current(self) -> _Loaded:
        # A rule source's stamp is compared on every call (it costs no I/O), so its changes apply
        # without waiting for the file check interval.
        if time.monotonic() - self._checked_at >= self._reload_interval_s or self._stamp() != self._loaded.stamp:
            self.reload_if_changed()
        return self._loaded

    def _load(self) -> _Loaded:
        # Read before the rules: a change that lands during the load moves the stamp again.
        stamp = self._stamp()
        try:
            mtimes = self._files.mtimes()
            review = load_column_review(self._files.column_review)
            adapter = self._rules.snapshot() if self._rules is not None else casbin.FileAdapter(str(self._files.policy))
            decider = self._enforcer(adapter, review, explain_allows=False)
            explainer = self._enforcer(adapter, review, explain_allows=True)
            if self._rules is None:
                version = self._files.content_hash(f"{obj}>{group}" for obj, group in self._groups)
            else:
                version = _source_version(self._files, decider)
            row_filters = load_row_filters(self._files.row_filters)
            scan_limits = load_scan_limits(self._files.scan_limits)
            quotas = load_quotas(self._files.quotas)
            approvals = load_approvals(self._files.approvals)
            redaction = load_redaction(self._files.redaction)
        except Exception as exc:
            # Fail closed: an unreadable or invalid policy set denies everything until it is fixed.
            log.error("policy.load_failed", error=str(exc), model=str(self._files.model))
            outage = self._rules is not None and not isinstance(exc, ConfigurationError)
            return _Loaded(None, None, "invalid", (), error=f"{type(exc).__name__}: {exc}", stamp=stamp, outage=outage)
        log.info("policy.loaded", version=version)
        return _Loaded(
            decider,
            explainer,
            version,
            mtimes,
            row_filters,
            scan_limits,
            quotas,
            approvals,
            stamp=stamp,
            redaction=redaction,
            review=review,
        )

    def _enforcer(self, adapter: Any, review: ColumnReview, *, explain_allows: bool) -> casbin.Enforcer:
        model = casbin.Enforcer.new_model(path=str(self._files.model))
        if explain_allows:
            # Under deny-overrides, pycasbin names only the deny rule; an allow-only copy of the
            # model names the allow rule that matched, so every decision can say why.
            model["e"]["e"].value = _ALLOW_ONLY_EFFECT
        enforcer = casbin.Enforcer(model, adapter)
        for obj, group in [*self._groups, *review.groups()]:
            enforcer.add_named_grouping_policy("g2", obj, group)
        return enforcer

    def _decide(self, loaded: _Loaded, subject: str, obj: str, action: str) -> Decision:
        if loaded.decider is None or loaded.explainer is None:
            # A shared rule store that could not be read is an outage (retry); a policy set that is
            # wrong (files, or no rules in the store) is a denial until the governance team fixes it.
            reason = f"policy set failed to load: {loaded.error}"
            return Decision(False, subject, obj, action, reason=reason, unavailable=loaded.outage)
        if not loaded.decider.enabled:
            return Decision(False, subject, obj, action, reason="policy enforcement was disabled")
        try:
            # One at a time (see _EVALUATING); decisions are cached per policy version, so this
            # lock is taken only on a cache miss.
            with _EVALUATING:
                allowed, rule = loaded.decider.enforce_ex(subject, obj, action)
                if allowed and not rule:
                    _, rule = loaded.explainer.enforce_ex(subject, obj, action)
        except Exception as exc:
            log.exception("policy.decide_failed", subject=subject, obj=obj, action=action)
            reason = f"policy evaluation failed: {exc}"
            return Decision(False, subject, obj, action, reason=reason, unavailable=True)
        reason = "allowed by rule" if allowed else ("denied by rule" if rule else "no rule allows it")
        return Decision(bool(allowed), subject, obj, action, tuple(str(part) for part in rule), reason)


def _source_version(files: PolicyFiles, enforcer: casbin.Enforcer) -> str:
    """The version of a policy set whose rules come from a `RuleSource`: a hash of the model, the
    row filters and every rule loaded (resource groups included), so that replicas that loaded the
    same rules report the same version, whenever they loaded them."""
    digest = hashlib.sha256()
    for path in (files.model, files.row_filters, files.redaction, files.scan_limits, files.quotas, files.approvals):
        digest.update(path.read_bytes() if path is not None and path.is_file() else b"")
    model = enforcer.get_model().model
    for section in ("p", "g"):
        for ptype, assertion in sorted(model.get(section, {}).items()):
            for rule in assertion.policy:
                digest.update(f"{ptype}, {', '.join(rule)}\n".encode())
    return digest.hexdigest()[:16]
