"""Access tools: explain_access says what a principal may do with a resource, which rule decides,
and what it can do instead.

The explanation is built on `policies.explain.SubjectPolicy`, the gate's own decisions for one
subject, over an `AccessCatalog` that says which resources exist: the call's scope here (so the
caller's own visibility applies: a dataset or metric it may not read looks missing), the catalog
definitions in `lakegate policy explain` (server/policy_commands.py), which prints the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import Field

from lakegate.catalog.document_search import CLASSIFICATIONS
from lakegate.catalog.metric_definitions import SemanticCatalog
from lakegate.catalog.metric_query import CompiledQuery, MetricQuery, describing_query
from lakegate.errors import InvalidArgument, NotFound
from lakegate.policies.explain import MASK_USES, ColumnRuling, SubjectPolicy
from lakegate.policies.resources import (
    CLASSIFICATION_MARK,
    METRIC_PREFIX,
    TOOL_PREFIX,
    column_resource,
    metric_resource,
)
from lakegate.policies.row_filters import RowFilter
from lakegate.tools.base import ToolArgs, ToolResult, ToolSpec
from lakegate.tools.names import ToolName
from lakegate.tools.scope import ToolScope

__all__ = [
    "ACCESS_TOOLS",
    "AccessCatalog",
    "AccessExplanation",
    "ExplainAccessArgs",
    "explain",
    "metric_query",
    "render_explanation",
]

Action = Literal["read", "write", "restore", "call"]
AskedAction = Literal["read", "write", "restore"]  # a tool's only action, call, is what "read" means for it
Kind = Literal["dataset", "column", "metric", "classification", "tool"]

#: The actions each kind of resource takes; the first is the one meant when none is given.
ACTIONS: dict[Kind, tuple[Action, ...]] = {
    "dataset": ("read", "write", "restore"),
    "column": ("read", "write"),
    "metric": ("read",),
    "classification": ("read",),
    "tool": ("call",),
}
CLASSIFICATION = CLASSIFICATION_MARK
RESOURCE_FORMS = (
    "a dataset 'sales.orders', a column 'sales.orders.region', 'metric:revenue', "
    "'kb.articles.classification:internal' or 'tool:query'"
)
ASK = "ask the governance team (a data steward) for access"


class ExplainAccessArgs(ToolArgs):
    resource: str = Field(
        max_length=300,
        description="A dataset, column, 'metric:<name>' or 'kb.articles.classification:<value>'.",
    )
    action: AskedAction = Field(default="read", description="read, write or restore.")
    principal: str = Field(default="", max_length=128, description="Whose access; default yours.")


class ColumnRule(ToolResult):
    name: str
    access: str
    rule: str


class AccessExplanation(ToolResult):
    principal: str
    resource: str
    action: str
    allowed: bool
    access: str  # allow, deny, clear, masked:<method> or hidden
    rule: str
    columns: list[ColumnRule]
    row_filters: list[str]
    advice: list[str]  # what can be done, or done instead


class AccessCatalog(Protocol):
    """Which resources exist, as the asker may see them."""

    def columns(self, dataset: str) -> list[str]:
        """The dataset's column names. Raises: NotFound (no such dataset, or not visible)."""
        ...

    def metric_reads(self, name: str) -> CompiledQuery:
        """The metric compiled: its inputs and the tables and columns it reads. Raises: NotFound."""
        ...


@dataclass(frozen=True)
class _Target:
    kind: Kind
    resource: str
    dataset: str = ""
    name: str = ""  # the column, metric, classification or tool name


def _parse(resource: str, catalog: AccessCatalog | None = None) -> _Target:
    """A resource's kind and parts. Three parts or more name a dataset of an attached catalog when
    `catalog` knows one of that name, else a column of the dataset the other parts name.

    Raises: InvalidArgument: not one of the resource forms."""
    resource = resource.strip()
    if resource.startswith(METRIC_PREFIX) and resource.removeprefix(METRIC_PREFIX):
        return _Target("metric", resource, name=resource.removeprefix(METRIC_PREFIX))
    if resource.startswith(TOOL_PREFIX) and resource.removeprefix(TOOL_PREFIX):
        return _Target("tool", resource, name=resource.removeprefix(TOOL_PREFIX))
    if CLASSIFICATION in resource:
        dataset, value = resource.split(CLASSIFICATION, 1)
        if dataset.count(".") == 1 and value:
            return _Target("classification", resource, dataset, value)
    parts = resource.split(".")
    if all(parts) and len(parts) == 2:
        return _Target("dataset", resource, resource)
    if all(parts) and len(parts) >= 3:
        if catalog is not None and _is_dataset(catalog, resource):
            return _Target("dataset", resource, resource)
        return _Target("column", resource, ".".join(parts[:-1]), parts[-1])
    raise InvalidArgument(f"'{resource[:300]}' is not a resource lakegate knows.", hint=f"Name {RESOURCE_FORMS}.")


def _is_dataset(catalog: AccessCatalog, name: str) -> bool:
    try:
        catalog.columns(name)
    except NotFound:
        return False
    return True


def _one_of(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def metric_query(semantic: SemanticCatalog, name: str) -> MetricQuery:
    """A query of the metric alone that reads every column it uses: by month where it has time, so
    that its time column counts too (describe_metric compiles the same one).

    Raises:
        NotFound: no such metric (or every version is retired).
    """
    return describing_query(semantic, semantic.metric(name))


@dataclass
class _Answer:
    allowed: bool
    access: str
    rule: str
    columns: list[ColumnRule]
    filters: list[RowFilter]
    advice: list[str]


def _denied(decision_rule: str, *advice: str) -> _Answer:
    return _Answer(False, "deny", decision_rule, [], [], list(advice))


def _column_advice(rulings: Sequence[ColumnRuling], who: str) -> list[str]:
    """One line per kind of restricted access: what the subject can still do with those columns."""
    by_label: dict[str, list[str]] = {}
    for ruling in rulings:
        if ruling.access != "clear":
            by_label.setdefault(ruling.label, []).append(ruling.column.rsplit(".", 1)[1])
    advice = []
    for label, names in by_label.items():
        listed = ", ".join(names)
        verb = "is" if len(names) == 1 else "are"
        if label == "hidden":
            advice.append(
                f"{listed} {verb} hidden from {who}: a query naming {'it' if len(names) == 1 else 'them'} is "
                f"refused; leave {'it' if len(names) == 1 else 'them'} out (SELECT * already does), or {ASK}."
            )
        else:
            advice.append(f"{listed} {verb} {MASK_USES[label.removeprefix('masked:')]}.")
    return advice


def _filter_advice(filters: Sequence[RowFilter]) -> list[str]:
    return [f"Only rows where {f.where} are visible ({f.subject}: {f.reason.rstrip('.')})." for f in filters]


def _read_dataset(policy: SubjectPolicy, dataset: str, names: Sequence[str], who: str) -> _Answer:
    decision = policy.decide(dataset, "read")
    if not decision.allowed:
        return _denied(decision.rule_text, f"list_datasets shows the datasets {who} may read; or {ASK}.")
    rulings = [policy.column(column_resource(dataset, name)) for name in names]
    filters = policy.row_filters(dataset)
    advice = _column_advice(rulings, who) + _filter_advice(filters)
    if not advice:
        advice.append("Every column and row is readable in clear.")
    columns = [ColumnRule(name=r.column.rsplit(".", 1)[1], access=r.label, rule=r.rule_text) for r in rulings]
    return _Answer(True, "allow", decision.rule_text, columns, filters, advice)


def _read_column(policy: SubjectPolicy, target: _Target, who: str) -> _Answer:
    dataset = policy.decide(target.dataset, "read")
    if not dataset.allowed:
        return _denied(dataset.rule_text, f"{who} may not read {target.dataset} at all; {ASK}.")
    ruling = policy.column(target.resource)
    filters = policy.row_filters(target.dataset)
    advice = _column_advice([ruling], who) + _filter_advice(filters)
    if not advice:
        advice.append(f"{target.name} is readable in clear.")
    return _Answer(ruling.access != "hidden", ruling.label, ruling.rule_text, [], filters, advice)


def _write(policy: SubjectPolicy, target: _Target, names: Sequence[str], who: str) -> _Answer:
    dataset = policy.decide(target.dataset, "write")
    if not dataset.allowed:
        readable = policy.decide(target.dataset, "read").allowed
        instead = f"{who} may read it: query it instead." if readable else f"Or {ASK}."
        return _denied(dataset.rule_text, f"append_rows refuses every row for {target.dataset}. {instead}")
    if target.kind == "column":
        column = policy.decide(target.resource, "write")
        if not column.allowed:
            return _denied(column.rule_text, f"Send the rows without {target.name} (omit it or send null).")
        return _Answer(True, "allow", f"{dataset.rule_text}; {column.rule_text}", [], [], [])
    columns = []
    for name in names:
        decision = policy.decide(column_resource(target.dataset, name), "write")
        columns.append(ColumnRule(name=name, access="allow" if decision.allowed else "deny", rule=decision.rule_text))
    denied = [c.name for c in columns if c.access == "deny"]
    advice = [f"A row may not set {', '.join(denied)}: omit {'it' if len(denied) == 1 else 'them'} or send null."]
    advice = advice if denied else []
    return _Answer(True, "allow", dataset.rule_text, columns, [], advice or ["append_rows may set every column."])


def _read_metric(policy: SubjectPolicy, name: str, compiled: CompiledQuery, who: str) -> _Answer:
    instead = f"list_metrics shows the metrics {who} may read."
    for metric in [name, *sorted(set(compiled.metrics) - {name})]:
        decision = policy.decide(metric_resource(metric), "read")
        if not decision.allowed:
            why = "" if metric == name else f"It is built on metric {metric}, which {who} may not read. "
            return _denied(decision.rule_text, why + instead)
    metric_rule = policy.decide(metric_resource(name), "read").rule_text
    columns: list[ColumnRule] = []
    filters: list[RowFilter] = []
    blocked: list[str] = []
    for table, names in sorted(compiled.columns.items()):
        table_decision = policy.decide(table, "read")
        if not table_decision.allowed:
            denied = [
                ColumnRule(name=column_resource(table, c), access="deny", rule=table_decision.rule_text)
                for c in sorted(names)
            ]
            columns += denied
            blocked.append(f"{who} may not read {table}")
            continue
        filters += policy.row_filters(table)
        for column in sorted(names):
            ruling = policy.column(column_resource(table, column))
            columns.append(ColumnRule(name=ruling.column, access=ruling.label, rule=ruling.rule_text))
            if ruling.access == "hidden":
                blocked.append(f"{ruling.column} is hidden from {who}")
    if blocked:
        first = next(c for c in columns if c.access in ("deny", "hidden"))
        return _Answer(False, "deny", first.rule, columns, filters, [f"The metric fails: {'; '.join(blocked)}."])
    advice = [f"It reads {c.name} {c.access}." for c in columns if c.access.startswith("masked")]
    advice += [f"It is computed over the rows where {f.where} only ({f.subject})." for f in filters]
    return _Answer(True, "allow", metric_rule, columns, filters, advice or ["query_metrics answers it in full."])


def _read_classification(policy: SubjectPolicy, target: _Target, who: str) -> _Answer:
    dataset = policy.decide(target.dataset, "read")
    if not dataset.allowed:
        return _denied(dataset.rule_text, f"{who} may not read {target.dataset} at all; {ASK}.")
    decision = policy.decide(target.resource, "read")
    if not decision.allowed:
        return _denied(
            decision.rule_text, f"search_documents leaves '{target.name}' passages out: never returned or counted."
        )
    roles = ", ".join(policy.roles) or "none"
    whose = "your" if who == "you" else f"{who}'s"
    advice = f"A '{target.name}' passage is readable when its allowed_roles include one of {whose} roles ({roles})."
    return _Answer(True, "allow", decision.rule_text, [], [], [advice])


def _check_exists(catalog: AccessCatalog, target: _Target) -> tuple[list[str], CompiledQuery | None]:
    """The dataset's columns or the compiled metric, after checking that the resource exists.

    Raises:
        NotFound: no such dataset, column, metric, classification or tool (or not visible to the asker).
    """
    if target.kind == "tool":
        if target.name not in {name.value for name in ToolName}:
            raise NotFound(f"There is no tool named '{target.name}'.", hint="List the tools to see them.")
        return [], None
    if target.kind == "metric":
        return [], catalog.metric_reads(target.name)
    names = catalog.columns(target.dataset)
    if target.kind == "column" and target.name not in names:
        raise NotFound(
            f"Dataset '{target.dataset}' has no column '{target.name}'.", hint="Call describe_dataset to see them."
        )
    if target.kind == "classification" and ("classification" not in names or target.name not in CLASSIFICATIONS):
        raise NotFound(
            f"Dataset '{target.dataset}' has no classification '{target.name}'.",
            hint=f"Classifications: {', '.join(CLASSIFICATIONS)}.",
        )
    return names, None


def explain(
    policy: SubjectPolicy, catalog: AccessCatalog, resource: str, action: str | None = None, *, own: bool = False
) -> AccessExplanation:
    """Explain what `policy.subject` may do with `resource` (see ExplainAccessArgs for the forms).

    `own` words the advice for the subject itself ("you") rather than by name.

    Raises:
        InvalidArgument: the resource is not one of the forms, or the action does not apply to it.
        NotFound: the resource does not exist, or `catalog` hides it from the asker.
    """
    target = _parse(resource, catalog)
    allowed_actions = ACTIONS[target.kind]
    chosen = action or allowed_actions[0]
    if target.kind == "tool" and chosen == "read":
        chosen = "call"  # the tool's default action: explain_access asks "read" unless told otherwise
    if chosen not in allowed_actions:
        raise InvalidArgument(
            f"Action '{chosen}' does not apply to a {target.kind}.", hint=f"Use {_one_of(allowed_actions)}."
        )
    names, compiled = _check_exists(catalog, target)
    who = "you" if own else policy.subject
    if target.kind == "tool":
        decision = policy.decide(target.resource, "call")
        answer = (
            _Answer(True, "allow", decision.rule_text, [], [], [])
            if decision.allowed
            else _denied(decision.rule_text, f"Only the tools listed to {who} may be called.")
        )
    elif target.kind == "metric":
        assert compiled is not None
        answer = _read_metric(policy, target.name, compiled, who)
    elif target.kind == "classification":
        answer = _read_classification(policy, target, who)
    elif chosen == "restore":
        decision = policy.decide(target.dataset, "restore")
        answer = _Answer(True, "allow", decision.rule_text, [], [], [])
        if not decision.allowed:
            answer = _denied(decision.rule_text, "restore_table is for data stewards and admins: ask one.")
    elif chosen == "write":
        answer = _write(policy, target, names, who)
    elif target.kind == "column":
        answer = _read_column(policy, target, who)
    else:
        answer = _read_dataset(policy, target.dataset, names, who)
    if not policy.roles:
        answer.advice.append(f"{policy.subject} holds no role: everything is denied by default.")
    return AccessExplanation(
        principal=policy.subject,
        resource=target.resource,
        action=chosen,
        allowed=answer.allowed,
        access=answer.access,
        rule=answer.rule,
        columns=answer.columns,
        row_filters=[f"{f.dataset}: {f.where} ({f.subject})" for f in answer.filters],
        advice=answer.advice,
    )


def render_explanation(result: AccessExplanation) -> str:
    """The compact text of an explanation (also what `lakegate policy explain` prints, in colour)."""
    lines = [f"{result.principal} {result.action} {result.resource}: {result.access}."]
    lines.append(f"Rule: {result.rule}")
    if result.columns:
        special = [f"{c.name} {c.access}" for c in result.columns if c.access not in ("clear", "allow")]
        plain = [c.name for c in result.columns if c.access in ("clear", "allow")]
        kind = "settable" if result.action == "write" else "clear"
        lines.append(
            f"Columns: {'; '.join(special) or 'none restricted'}" + (f"; {kind}: {', '.join(plain)}" if plain else "")
        )
    lines += [f"- {text}" for text in result.advice]
    return "\n".join(lines)


class _ScopeCatalog:
    """Resources as the caller of this tool call may see them: the same NotFound as describe_dataset
    and describe_metric for what it may not read, so that explaining never reveals a hidden name."""

    def __init__(self, scope: ToolScope) -> None:
        self._scope = scope

    def columns(self, dataset: str) -> list[str]:
        info, _ = self._scope.dataset(dataset)
        return [column.name for column in info.columns]

    def metric_reads(self, name: str) -> CompiledQuery:
        self._scope.require_metric(name)
        return self._scope.compile_metrics(metric_query(self._scope.semantic, name))


def explain_access(scope: ToolScope, args: ExplainAccessArgs) -> AccessExplanation:
    policy = scope.policy_for(args.principal.strip() or None)
    own = policy.subject == scope.principal.name
    result = explain(policy, _ScopeCatalog(scope), args.resource, args.action, own=own)
    scope.rows += 1
    scope.details.update(
        operation="explain_access",
        explained_principal=result.principal,
        explained_resource=result.resource,
        explained_action=result.action,
        explained_access=result.access,
        explained_rule=result.rule,
    )
    return result


ACCESS_TOOLS: tuple[ToolSpec[Any, Any], ...] = (
    ToolSpec(
        name=ToolName.EXPLAIN_ACCESS,
        title="Explain access",
        args=ExplainAccessArgs,
        result=AccessExplanation,
        handler=explain_access,
        render=render_explanation,
        read_only=True,
        destructive=False,
        idempotent=True,
        family="catalog",
    ),
)
