"""A query's filter written as dbt MetricFlow writes one: SQL over `{{ Dimension('...') }}`,
`{{ TimeDimension('metric_time', 'day') }}` and `{{ Entity('...') }}` references, with AND, OR and
NOT, e.g. `NOT ({{ Dimension('customer__country') }} = 'MX' OR {{ Dimension('order__is_large') }})`.

The text comes from an agent, so it is read, never spliced: sqlglot parses it (each reference a
placeholder column), and only comparisons of one reference with literal values, IN lists, IS
[NOT] NULL, BETWEEN, a boolean dimension alone, and AND, OR and NOT over these are accepted. What
comes out is the same typed filters the `where` list holds (DimensionFilter), combined by
FilterTree; the compiler writes the SQL from them, values as quoted literals.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

import sqlglot
from sqlglot import exp

from lakegate.catalog.metric_definitions import REFERENCE_PREFIX, SavedQuery, split_references
from lakegate.catalog.metric_query import DimensionFilter, FilterOp, FilterTree, MetricQuery, query_error
from lakegate.errors import LakegateError

__all__ = ["compared_values", "hide_filter_values", "parse_filter", "saved_metric_query"]

_HINT = (
    "Write a filter as comparisons of {{ Dimension('entity__dimension') }} (or TimeDimension('metric_time', "
    "'day'), or Entity('name')) with values, joined by AND, OR and NOT; or send {dimension, op, value} objects."
)
_PLACEHOLDER = re.compile(rf"^{REFERENCE_PREFIX}(\d+)$")
_COMPARISONS: dict[type[exp.Expr], FilterOp] = {exp.EQ: "=", exp.NEQ: "!=", exp.LT: "<", exp.LTE: "<=",
                                                exp.GT: ">", exp.GTE: ">="}  # fmt: skip
_FLIPPED: dict[FilterOp, FilterOp] = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "!=": "!="}

Condition = DimensionFilter | FilterTree


#: How deeply a filter may nest parentheses or NOTs (sqlglot parses by recursion).
MAX_DEPTH = 40


def _parsed(text: str) -> tuple[exp.Expr, list[str]]:
    depth = deepest = 0
    for character in text:
        depth += {"(": 1, ")": -1}.get(character, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH or len(re.findall(r"(?i)\bnot\b", text)) > MAX_DEPTH:
        raise query_error(f"A where filter nests more than {MAX_DEPTH} deep.", _HINT)
    try:
        sql, names = split_references(text)
    except ValueError as exc:
        # Not the parser's message: it quotes the text, values included.
        raise query_error("A where filter has a reference lakegate does not understand.", _HINT) from exc
    try:
        tree = sqlglot.parse_one(sql, dialect="duckdb")
    except sqlglot.errors.SqlglotError as exc:
        # sqlglot's message quotes the text, which may hold a value the audit record must not show.
        raise query_error("A where filter does not parse as SQL.", _HINT) from exc
    return tree, names


def parse_filter(text: str) -> tuple[Condition, ...]:
    """The filter's conditions, one per term of its top-level AND.

    Raises:
        InvalidArgument: not a filter of this form (the message names the construct, never a value).
    """
    tree, names = _parsed(text)
    reader = _Reader(names)
    conditions: list[Condition] = []
    for term in _terms(tree, exp.And):
        read = reader.condition(term)
        # A BETWEEN alone is two filters joined by AND, as a metric_time filter must be.
        conditions += read.items if isinstance(read, FilterTree) and read.op == "and" else [read]
    return tuple(conditions)


def saved_metric_query(saved: SavedQuery, *, where: tuple[DimensionFilter | FilterTree, ...] = ()) -> MetricQuery:
    """The query a saved query asks, with `where` joined to its own filters by AND.

    Raises:
        InvalidArgument: one of its filters is not a filter lakegate reads.
    """
    own = tuple(condition for text in saved.where for condition in parse_filter(text))
    return MetricQuery(saved.metrics, saved.group_by, (*own, *where), saved.order_by, limit=saved.limit)


def _terms(node: exp.Expr, kind: type[exp.Expr]) -> list[exp.Expr]:
    """The operands of a chain of `kind` (AND or OR), parentheses removed."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, kind) and isinstance(node, exp.Binary):
        return [*_terms(node.left, kind), *_terms(node.right, kind)]
    return [node]


class _Reader:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def condition(self, node: exp.Expr) -> Condition:
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.And):
            return FilterTree("and", tuple(self.condition(term) for term in _terms(node, exp.And)))
        if isinstance(node, exp.Or):
            return FilterTree("or", tuple(self.condition(term) for term in _terms(node, exp.Or)))
        if isinstance(node, exp.Not):
            inner = node.this
            while isinstance(inner, exp.Paren):
                inner = inner.this
            read = self.condition(inner)
            if isinstance(read, DimensionFilter) and read.op in ("in", "is null"):
                return DimensionFilter(read.dimension, "not in" if read.op == "in" else "is not null", read.value)
            return FilterTree("not", (read,))
        if type(node) in _COMPARISONS and isinstance(node, exp.Binary):
            op = _COMPARISONS[type(node)]
            left, right = node.left, node.right
            if self.reference(right) is not None and self.reference(left) is None:
                left, right, op = right, left, _FLIPPED[op]
            return DimensionFilter(self._dimension(left), op, self._value(right))
        if isinstance(node, exp.In):
            if node.args.get("query") is not None or node.args.get("unnest") is not None or not node.expressions:
                raise self._refused(node)
            return DimensionFilter(self._dimension(node.this), "in", [self._value(v) for v in node.expressions])
        if isinstance(node, exp.Is) and isinstance(node.expression, exp.Null):
            return DimensionFilter(self._dimension(node.this), "is null")
        if isinstance(node, exp.Between) and not node.args.get("symmetric"):
            name = self._dimension(node.this)
            low, high = self._value(node.args["low"]), self._value(node.args["high"])
            return FilterTree("and", (DimensionFilter(name, ">=", low), DimensionFilter(name, "<=", high)))
        if self.reference(node) is not None:  # a boolean dimension alone
            return DimensionFilter(self._dimension(node), "=", True)
        raise self._refused(node)

    def reference(self, node: exp.Expr) -> str | None:
        if isinstance(node, exp.Column) and not node.table:
            match = _PLACEHOLDER.match(node.name)
            if match and int(match[1]) < len(self.names):
                return self.names[int(match[1])]
        return None

    def _dimension(self, node: exp.Expr) -> str:
        name = self.reference(node)
        if name is None:
            if isinstance(node, exp.Column):
                raise query_error("A where filter names a column: name dimensions as references.", _HINT)
            raise self._refused(node)
        return name

    def _value(self, node: exp.Expr) -> Any:
        if (
            isinstance(node, exp.Cast)
            and isinstance(node.this, exp.Literal)
            and node.this.is_string
            and node.to.is_type(*exp.DataType.TEMPORAL_TYPES)
        ):
            return node.this.this  # DATE '2022-03-01', CAST('...' AS TIMESTAMP): the text of the date
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
            return -_number(node.this.this)
        if isinstance(node, exp.Literal):
            return node.this if node.is_string else _number(node.this)
        if isinstance(node, exp.Boolean):
            return bool(node.this)
        if isinstance(node, exp.Null):
            return None
        raise self._refused(node)

    @staticmethod
    def _refused(node: exp.Expr) -> Exception:
        # The construct's kind only: its text may hold a value of a tagged dimension.
        return query_error(f"A where filter may not hold {node.key.upper()} (only comparisons with values).", _HINT)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def compared_values(text: str) -> list[tuple[str, Any]]:
    """Each (dimension, value) a filter compares, a list's items one by one; [] when lakegate
    refuses the filter (the call then fails before any SQL is written)."""
    try:
        conditions = parse_filter(text)
    except LakegateError:
        return []
    leaves = FilterTree("and", conditions).leaves()
    return [
        (leaf.dimension, value)
        for leaf in leaves
        if leaf.value is not None
        for value in (leaf.value if isinstance(leaf.value, list) else [leaf.value])
    ]


def hide_filter_values(text: str, hidden: Callable[[str], bool], marker: Callable[[Any], str]) -> str | None:
    """The filter with each value compared to a reference that `hidden` names replaced by
    `marker(value)`, references written back as `{{ Dimension('name') }}`; None when it names a
    hidden dimension and lakegate refuses it or it does not parse (then the whole text must be
    hidden: a refused construct may hold a value in any form)."""
    try:
        tree, names = _parsed(text)
    except LakegateError:
        return None
    if not any(hidden(name) for name in names):
        return text
    reader = _Reader(names)
    try:
        for term in _terms(tree, exp.And):
            reader.condition(term)
    except LakegateError:
        return None
    for node in list(tree.find_all(exp.Predicate)):
        if any(hidden(name) for name in map(reader.reference, node.find_all(exp.Column)) if name is not None):
            for literal in list(node.find_all(exp.Literal)):
                literal.replace(exp.Literal.string(marker(literal.this)))
    # Each reference written back by a name no value can hold (a value may spell lakegate_ref_0).
    nonce = secrets.token_hex(8)
    for column in list(tree.find_all(exp.Column)):
        if (name := reader.reference(column)) is not None:
            column.replace(exp.column(f"lakegate_{nonce}_{names.index(name)}"))
    shown = tree.sql(dialect="duckdb")
    return re.sub(rf"lakegate_{nonce}_(\d+)", lambda m: "{{ Dimension('" + names[int(m[1])] + "') }}", shown)
