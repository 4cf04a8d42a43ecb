"""Tool arguments as the audit log may hold them: sensitive values as a keyed hash, huge ones cut.

What is sensitive is policy (policies/redaction.yaml, `RedactionRules`): argument names that are
sensitive wherever they appear, and column tags whose values are sensitive where a call names the
column (the rows of append_rows; the where filters of query_metrics on a dimension computed from
such a column). A sensitive value is logged as ``[redacted hmac-sha256:<16 hex>]``: HMAC-SHA256
under a secret of the state directory (``<home>/audit.key``, created 0600 on first use, never
logged), so equal values still correlate across records, and a reader without the key cannot
confirm a guess by hashing it. A string is hashed as its UTF-8 bytes, anything else as its
canonical JSON; null stays null (it hides nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

from lakegate.catalog.definitions import CatalogDefinitions
from lakegate.catalog.metric_definitions import SemanticCatalog
from lakegate.catalog.metric_filters import compared_values, hide_filter_values
from lakegate.catalog.metric_query import parse_dimension
from lakegate.errors import AuditWriteError, InvalidArgument
from lakegate.policies.redaction import RedactionRules
from lakegate.server.audit.files import create_private_file
from lakegate.server.audit.log import canonical_json
from lakegate.tools.names import ToolName

__all__ = [
    "KEY_FILE",
    "MAX_LOGGED_ITEMS",
    "MAX_LOGGED_STRING",
    "REDACTED",
    "AuditKey",
    "audit_arguments",
    "hidden_filter_values",
    "hide_filter_values_in_sql",
    "redact_arguments",
]

#: What a sensitive value becomes when no key is given (`redact_arguments` without ``key``).
REDACTED = "[redacted]"
MAX_LOGGED_STRING = 2000
#: A long list argument (the rows of an append) is logged by its first items and its length: the
#: data itself lives in the table, whose snapshot the record names.
MAX_LOGGED_ITEMS = 20
KEY_FILE = "audit.key"
_KEY_TEXT = re.compile(r"[0-9a-f]{64}")


class AuditKey:
    """The secret that keys the hashes of redacted values, read (or created) on first use.

    The file holds 32 random bytes as hex, is created with mode 0600, and the first process to
    create it wins (the others read its key), so every writer of one state directory hashes alike.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._secret: bytes | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AuditKey({str(self.path)!r})"  # never the secret

    def marker(self, value: Any) -> str:
        """``value`` as the log shows it: ``[redacted hmac-sha256:<first 16 hex digits>]``.

        Raises:
            AuditWriteError: the key file cannot be read or created, or holds no key.
        """
        if isinstance(value, str):
            data = value.encode("utf-8", "surrogatepass")
        else:
            try:
                data = canonical_json(value).encode("utf-8", "surrogatepass")
            except (TypeError, ValueError):
                data = repr(value).encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key(), data, hashlib.sha256).hexdigest()
        return f"[redacted hmac-sha256:{digest[:16]}]"

    def _key(self) -> bytes:
        with self._lock:
            if self._secret is None:
                try:
                    self._secret = _read_or_create_key(self.path)
                except (OSError, ValueError) as exc:
                    raise AuditWriteError(f"cannot read or create the audit key {self.path}: {exc}") from exc
            return self._secret


def _read_or_create_key(path: Path) -> bytes:
    create_private_file(path, (secrets.token_hex(32) + "\n").encode("ascii"))
    text = path.read_text(encoding="ascii").strip()
    if not _KEY_TEXT.fullmatch(text):
        raise ValueError("the file does not hold a key of 64 hex digits")
    return bytes.fromhex(text)


def loggable(text: str) -> str:
    """Text that UTF-8 JSON can hold: a lone surrogate (valid in a JSON string, not in UTF-8) is
    kept visible as its escape, so that the record can be written and still shows what was sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def redact_arguments(
    arguments: Mapping[str, Any],
    sensitive: Iterable[str],
    *,
    key: AuditKey | None = None,
    everything: bool = False,
) -> dict[str, Any]:
    """Arguments as the audit log may hold them: values of ``sensitive`` names (at any depth,
    case-insensitive) hidden, huge strings and lists cut.

    A hidden value becomes ``key.marker(value)``, or `REDACTED` without a key. ``everything``
    hides every value that is not null (the keys and the shape stay).

    Raises:
        AuditWriteError: the key is needed and cannot be read or created.
    """
    names = frozenset(name.lower() for name in sensitive)

    def hide(value: Any) -> Any:
        if value is None:
            return None
        return key.marker(value) if key is not None else REDACTED

    def clean(name: str, value: Any) -> Any:
        if name.lower() in names:
            return hide(value)
        if isinstance(value, Mapping):
            return {loggable(str(k)): clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            kept = [clean(name, v) for v in value[:MAX_LOGGED_ITEMS]]
            if len(value) > MAX_LOGGED_ITEMS:
                kept.append(f"...[{len(value) - MAX_LOGGED_ITEMS} more items]")
            return kept
        if everything:
            return hide(value)
        if isinstance(value, str) and len(value) > MAX_LOGGED_STRING:
            value = value[:MAX_LOGGED_STRING] + f"...[{len(value) - MAX_LOGGED_STRING} more characters]"
        if isinstance(value, str):
            return loggable(value)
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # strict JSON has no infinity: keep what was sent, as text
        if value is None or isinstance(value, bool | int | float):
            return value
        return repr(value)[:MAX_LOGGED_STRING]

    return {loggable(str(name)): clean(str(name), value) for name, value in arguments.items()}


def audit_arguments(
    tool: str,
    arguments: Mapping[str, Any],
    rules: RedactionRules,
    key: AuditKey,
    *,
    definitions: CatalogDefinitions,
    semantic: SemanticCatalog | None = None,
    extra_names: Iterable[str] = (),
) -> dict[str, Any]:
    """The arguments of one call of ``tool`` as its audit record holds them, under ``rules``.

    Raises:
        AuditWriteError: the key is needed and cannot be read or created.
    """
    if rules.everything:
        return redact_arguments(arguments, (), key=key, everything=True)
    tagged = _hide_tagged_values(tool, arguments, rules.column_tags, key, definitions, semantic)
    return redact_arguments(tagged, (*rules.arguments, *extra_names), key=key)


#: What a call's SQL in its audit record becomes when a hidden filter value could not be cut out of it.
SQL_WITHHELD = "[withheld: it held a filter value the audit record hides]"  # also an error text
#: The fields of a call's details that hold the SQL a metric query compiled to.
_SQL_DETAILS = ("compiled_sql", "rewritten_sql")


def hidden_filter_values(
    tool: str,
    arguments: Mapping[str, Any],
    rules: RedactionRules,
    *,
    definitions: CatalogDefinitions,
    semantic: SemanticCatalog | None,
    extra_names: Iterable[str] = (),
) -> list[Any]:
    """Every filter value of a call of ``tool`` that its audited arguments hide, read from the
    arguments as sent: the values compared with a tagged dimension, or every value where the rules
    hide everything or name `where` or `value` among the sensitive arguments; typed filters' values,
    a list's items one by one, and the values in filters written as text."""
    if tool != ToolName.QUERY_METRICS.value or semantic is None:
        return []
    where = arguments.get("where")
    if not isinstance(where, list):
        return []
    names = {name.lower() for name in (*rules.arguments, *extra_names)}
    every = rules.everything or bool(names & {"where", "value"})

    def tagged(dimension: Any) -> bool:
        if every:
            return True
        return isinstance(dimension, str) and _dimension_is_tagged(dimension, rules.column_tags, definitions, semantic)

    values: list[Any] = []
    for item in where:
        if isinstance(item, str):
            values += [value for dimension, value in compared_values(item) if tagged(dimension)]
        elif isinstance(item, Mapping) and item.get("value") is not None and tagged(item.get("dimension")):
            value = item["value"]
            values += value if isinstance(value, list) else [value]
    return values


def hide_filter_values_in_sql(
    details: Mapping[str, Any], error: str | None, hidden: Sequence[Any], key: AuditKey
) -> tuple[dict[str, Any], str | None]:
    """``details`` and ``error`` with each of the ``hidden`` filter values (hidden_filter_values)
    replaced by its marker in the SQL the call compiled to, and in its error text; where a value
    cannot be cut out exactly, the whole text is withheld. The arguments alone are not enough: the
    compiled SQL holds each filter value as a literal, and an engine's error may quote it.
    """
    if not hidden:
        return dict(details), error

    def cleaned(text: str) -> str:
        for value in hidden:
            if isinstance(value, str):
                marker = key.marker(value).replace("'", "''")
                text = text.replace("'" + value.replace("'", "''") + "'", "'" + marker + "'")
        # Any form of a hidden value left (as sent, as the SQL writes it, with its quotes doubled) withholds it.
        for value in hidden:
            forms = {str(value), value.replace("'", "''")} if isinstance(value, str) else {str(value), repr(value)}
            if isinstance(value, bool):
                forms = set()  # TRUE and FALSE say nothing a reviewer may not read
            if any(form and form in text for form in forms):
                return SQL_WITHHELD
        return text

    kept = dict(details)
    for field in _SQL_DETAILS:
        if isinstance(kept.get(field), str):
            kept[field] = cleaned(kept[field])
    return kept, cleaned(error) if error is not None else None


def tagged_columns(definitions: CatalogDefinitions, table: str, tags: frozenset[str]) -> frozenset[str]:
    """Lower-case names of the columns of ``table`` that carry one of ``tags``."""
    dataset = definitions.dataset(table.strip().lower())
    if dataset is None or not tags:
        return frozenset()
    return frozenset(column.name.lower() for column in dataset.columns if tags & set(column.tags))


def _hide_tagged_values(
    tool: str,
    arguments: Mapping[str, Any],
    tags: frozenset[str],
    key: AuditKey,
    definitions: CatalogDefinitions,
    semantic: SemanticCatalog | None,
) -> Mapping[str, Any]:
    """A copy of ``arguments`` with the values of tagged columns replaced by their markers."""
    if not tags:
        return arguments
    if tool == ToolName.APPEND_ROWS.value:
        table, rows = arguments.get("table"), arguments.get("rows")
        if not isinstance(table, str) or not isinstance(rows, list):
            return arguments
        columns = tagged_columns(definitions, table, tags)
        if not columns:
            return arguments
        hidden = [_hide_row(row, columns, key) if isinstance(row, Mapping) else row for row in rows]
        return {**arguments, "rows": hidden}
    if tool == ToolName.QUERY_METRICS.value and semantic is not None:
        where = arguments.get("where")
        if not isinstance(where, list):
            return arguments
        filters = [_hide_filter(item, tags, key, definitions, semantic) for item in where]
        return {**arguments, "where": filters}
    return arguments


def _hide_row(row: Mapping[str, Any], columns: frozenset[str], key: AuditKey) -> dict[str, Any]:
    return {
        name: key.marker(value) if str(name).lower() in columns and value is not None else value
        for name, value in row.items()
    }


def _hide_filter(
    item: Any, tags: frozenset[str], key: AuditKey, definitions: CatalogDefinitions, semantic: SemanticCatalog
) -> Any:
    if isinstance(item, str):  # a filter as dbt MetricFlow writes one: the values of tagged dimensions in it
        shown = hide_filter_values(
            item, lambda name: _dimension_is_tagged(name, tags, definitions, semantic), key.marker
        )
        return shown if shown is not None else key.marker(item)
    if not isinstance(item, Mapping) or item.get("value") is None:
        return item
    dimension = item.get("dimension")
    if not isinstance(dimension, str) or not _dimension_is_tagged(dimension, tags, definitions, semantic):
        return item
    value = item["value"]
    hidden = [key.marker(v) for v in value] if isinstance(value, list) else key.marker(value)
    return {**item, "value": hidden}


def _dimension_is_tagged(
    name: str, tags: frozenset[str], definitions: CatalogDefinitions, semantic: SemanticCatalog
) -> bool:
    """Whether dimension ``name`` (entity__dimension[__grain], or an entity) is computed from a
    tagged column."""
    try:
        ref = parse_dimension(name, grain_required=False)
    except InvalidArgument:
        return False  # not a dimension: the call fails, and no column is named
    if ref.owner is None:
        return False  # metric_time
    if ref.dimension is None:  # an entity: its key, in any model that holds it
        keys = [(model.table, entity.expr) for model in semantic.semantic_models for entity in model.entities
                if entity.name == ref.entity]  # fmt: skip
        return any(_reads_tagged(table, sql, tags, definitions) for table, sql in keys)
    model = semantic.model_with_primary(ref.owner)  # the model at the end of the path holds it
    if model is None:
        return False
    dimension, key = model.dimension(ref.dimension), model.entity(ref.dimension)
    if dimension is not None:
        return _reads_tagged(model.table, dimension.expr or f'"{dimension.name}"', tags, definitions)
    return key is not None and _reads_tagged(model.table, key.expr, tags, definitions)


def _reads_tagged(table: str, sql: str, tags: frozenset[str], definitions: CatalogDefinitions) -> bool:
    """Whether ``sql`` over ``table``'s columns reads a column with one of ``tags``."""
    columns = tagged_columns(definitions, table, tags)
    if not columns:
        return False
    try:
        parsed = sqlglot.parse_one(sql, dialect="duckdb")
    except sqlglot.errors.SqlglotError:
        return True  # cannot tell which columns it reads: hide rather than guess
    return any(column.name.lower() in columns for column in parsed.find_all(exp.Column))
