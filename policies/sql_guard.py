"""The SQL guard: what SQL an agent may run, which tables and columns it touches, and the rewrite
that applies column and row policy.

Three steps, all on sqlglot's syntax tree (DuckDB dialect), none touching an engine:

1. `parse_query` accepts exactly one read-only statement (SELECT, WITH ... SELECT, set operations)
   and rejects everything else: DDL, DML, SELECT INTO, ATTACH, COPY, PRAGMA, SET, INSTALL/LOAD,
   CALL, several statements, parameters, and every function or table function that reaches files,
   URLs, the engine's internals or lakegate's own mask macros. Tables must be named
   `namespace.table` (or be a CTE of the query).
2. `resolve_columns` finds, through CTEs, subqueries, aliases, `*`, USING/NATURAL joins and set
   operations, which columns of which governed table the query reads; a reference to a column the
   caller may not see is refused with the column named.
3. `rewrite` replaces every reference to a governed table with a subquery over its governed scan
   (visible columns only, masked ones through their mask, row filters in its WHERE). This is the
   structural guarantee: whatever the rest of the query does, it can only ever read that subquery,
   so `*` expands to visible columns and no aggregate or join can see a filtered row.

The DuckDB sandbox (catalog/query_engine.py) is the second wall: even SQL that got past this guard
cannot read a file outside the warehouse.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import OptimizeError, ParseError, SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope

from lakegate.errors import InvalidQuery, PolicyDenied
from lakegate.policies.governed_sql import DUCKDB, GovernedSql
from lakegate.policies.masks import MACRO_PREFIX
from lakegate.policies.sql_functions import TABLE_FUNCTIONS, function_allowed

__all__ = [
    "DIALECT",
    "EMBEDDED_CATALOG",
    "GuardedQuery",
    "InvalidQuery",
    "ResolvedColumns",
    "TableColumns",
    "check_functions",
    "function_allowed",
    "parse_query",
    "resolve_columns",
    "rewrite",
    "table_name",
]

DIALECT = DUCKDB
MAX_NESTING = 48
#: DuckDB's join-order search cannot be interrupted, so a query naming hundreds of tables would
#: hold a sandbox past the time limit: refuse it before it is planned.
MAX_TABLE_REFERENCES = 32

# sqlglot warns on stderr when it falls back to a raw Command; those are refused anyway.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

QUERY_HINT = "Send one SELECT (or WITH ... SELECT) over tables named namespace.table; list_datasets shows them."

_FORBIDDEN_NODES: tuple[type[exp.Expression], ...] = (
    exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter, exp.TruncateTable,
    exp.Command, exp.Copy, exp.Set, exp.Pragma, exp.Use, exp.Into, exp.Attach, exp.Detach, exp.Install,
    exp.Export, exp.Describe, exp.Summarize, exp.Show, exp.Transaction, exp.Commit, exp.Rollback,
    exp.Cache, exp.Uncache, exp.Refresh, exp.Analyze, exp.LoadData, exp.Grant, exp.Revoke, exp.Comment,
    exp.Kill, exp.Declare, exp.Execute,
)  # fmt: skip

_TABLE_ARGS = frozenset({"this", "db", "catalog", "alias", "pivots"})
_GENERATED_NAME = re.compile(r'^"?([A-Za-z_][\w$]*)"?\s*(?:\(|$)')
_UNRESOLVED = re.compile(r"""(?:Column '|Unknown column: )"?([^"'\s.]+)"?""")


@dataclass(frozen=True)
class GuardedQuery:
    """A query that passed the guard: its tree and the governed tables it names."""

    sql: str
    tree: exp.Query
    tables: tuple[str, ...]  # "namespace.table", sorted, without duplicates
    ordered: bool  # the outermost query has an ORDER BY (paging is stable)


def _invalid(message: str, hint: str = QUERY_HINT) -> InvalidQuery:
    return InvalidQuery(message, hint=hint)


def _function_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return node.sql_name().lower()


def _check_function(node: exp.Func) -> None:
    # sqlglot may know a function under another name than the one DuckDB runs (version() parses as
    # CurrentVersion), so the name as generated for DuckDB is checked too.
    generated = _GENERATED_NAME.match(node.sql(DIALECT))
    for name in (_function_name(node), generated.group(1).lower() if generated else ""):
        if name and not function_allowed(name):
            raise _invalid(
                f"The function {name}() is not allowed: it reads files or URLs, or reveals the engine's internals.",
                "Query the governed tables (namespace.table) with plain SQL functions instead.",
            )


_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'")


def check_functions(tree: exp.Expr) -> None:
    """Refuse a tree that calls a function agents may not call (row filters are checked with it).

    Raises:
        InvalidQuery: the tree holds such a function.
    """
    for node in tree.walk():
        if isinstance(node, exp.Func):
            _check_function(node)


def _nesting(sql: str) -> int:
    depth = deepest = 0
    for char in _STRING_LITERAL.sub("''", sql):  # parentheses inside strings do not nest
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    return deepest


def _names_cte(table: exp.Table) -> bool:
    """Whether a bare table name is a CTE in scope where it stands, by DuckDB's scoping rules.

    A query sees the CTEs of its own WITH and of every enclosing one; a CTE sees the CTEs before it
    in its WITH, and itself only from the recursive term of a WITH RECURSIVE whose body is a plain
    UNION [ALL]. Any other bare name
    DuckDB looks up in its catalog (pg_proc holds the mask macros and their hash key, pg_settings
    the sandbox's settings), so a CTE of the same name elsewhere in the query must not vouch for it.
    """
    name = table.name.lower()
    path: list[exp.Expr] = [table]
    child: exp.Expr = table
    parent = table.parent
    while parent is not None:
        if isinstance(parent, exp.With) and isinstance(child, exp.CTE):
            position = next(i for i, cte in enumerate(parent.expressions) if cte is child)
            if any(str(cte.alias_or_name).lower() == name for cte in parent.expressions[:position]):
                return True
            body = child.this
            # DuckDB binds a recursive CTE only for a plain UNION [ALL] (not BY NAME, INTERSECT or
            # EXCEPT), and the self-reference only in its recursive (right-hand) term.
            if (
                parent.args.get("recursive")
                and str(child.alias_or_name).lower() == name
                and isinstance(body, exp.Union)
                and not body.args.get("by_name")
                and any(node is body.expression for node in path)
            ):
                return True
        elif (
            not isinstance(child, exp.With)
            and isinstance(scope_with := parent.args.get("with_"), exp.With)
            and any(str(cte.alias_or_name).lower() == name for cte in scope_with.expressions)
        ):
            return True
        path.append(parent)
        child, parent = parent, parent.parent
    return False


#: The embedded catalog's name where a table reference needs three parts (column resolution puts
#: every table in a catalog). Not a name an attached catalog may have: those start with a letter.
EMBEDDED_CATALOG = "_embedded"


def table_name(table: exp.Table) -> str | None:
    """The dataset a table reference names: "namespace.table" in the embedded catalog,
    "catalog.namespace.table" in an attached one (a nested namespace is one quoted part:
    lake."sales.emea".orders); None for a bare name (a CTE)."""
    if not table.db:
        if table.args.get("catalog") is not None:
            raise _invalid(f"Table {table.sql(DIALECT)} has no namespace; name tables as namespace.table.")
        return None
    catalog = table.catalog
    if not catalog or catalog == EMBEDDED_CATALOG:
        return f"{table.db}.{table.name}".lower()
    return f"{catalog}.{table.db}.{table.name}".lower()


def _name_parts(name: str) -> tuple[str, str, str]:
    """(catalog, namespace, table) of a dataset name, the embedded catalog's for two parts."""
    parts = name.split(".")
    if len(parts) == 2:
        return EMBEDDED_CATALOG, parts[0], parts[1]
    return parts[0], ".".join(parts[1:-1]), parts[-1]


def parse_query(sql: str, *, max_chars: int) -> GuardedQuery:
    """Accept one read-only statement and name the governed tables it reads.

    Raises:
        InvalidQuery: empty, too long, too deeply nested, not parseable, not exactly one read-only
            statement, or it uses a forbidden function, table function or table form.
    """
    if not sql.strip():
        raise _invalid("The SQL is empty.")
    if len(sql) > max_chars:
        raise _invalid(f"The SQL is {len(sql):,} characters long; the most lakegate accepts is {max_chars:,}.")
    if "\x00" in sql or any(0xD800 <= ord(char) <= 0xDFFF for char in sql):
        raise _invalid("The SQL holds a NUL character or invalid Unicode.", "Send plain UTF-8 SQL text.")
    if _nesting(sql) > MAX_NESTING:
        raise _invalid(f"The SQL nests parentheses more than {MAX_NESTING} deep.", "Use CTEs (WITH) instead.")
    try:
        statements = [s for s in sqlglot.parse(sql, dialect=DIALECT) if s is not None]
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f" at line {first.get('line')}, column {first.get('col')}" if first else ""
        raise _invalid(f"The SQL does not parse{where}: {first.get('description', exc)}.") from exc
    except RecursionError as exc:
        raise _invalid("The SQL nests expressions too deeply to be parsed.", "Use CTEs (WITH) instead.") from exc
    except SqlglotError as exc:
        raise _invalid(f"The SQL cannot be parsed: {exc}") from exc
    if len(statements) != 1:
        raise _invalid(f"Send exactly one statement; this SQL holds {len(statements)}.")
    tree = statements[0]
    while isinstance(tree, exp.Subquery) and isinstance(tree.this, exp.Query):
        tree = tree.this  # "(SELECT ...)" is the SELECT itself
    if not isinstance(tree, exp.Select | exp.SetOperation):
        kind = type(tree).__name__.upper()
        raise _invalid(f"Only read-only queries (SELECT) are allowed; this is a {kind} statement.")

    tables: set[str] = set()
    references = 0
    for node in tree.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            raise _invalid(f"{type(node).__name__.upper()} is not allowed inside a query: lakegate runs read-only SQL.")
        if isinstance(node, exp.Placeholder | exp.Parameter):
            raise _invalid("Query parameters (?, $1, :name) are not supported.", "Write the values into the SQL.")
        if isinstance(node, exp.DataType) and node.this == exp.DataType.Type.USERDEFINED:
            # sqlglot writes a type it does not know back as raw text: a quoted "type" would run as SQL.
            raise _invalid(
                f"The type {node.sql(DIALECT)[:60]} is not one lakegate knows.",
                "Cast to a built-in DuckDB type (INTEGER, BIGINT, DOUBLE, DECIMAL(p, s), VARCHAR, DATE, ...).",
            )
        if isinstance(node, exp.Func):
            _check_function(node)
        if isinstance(node, exp.Table):
            governed = _check_table(node)
            tables.update(governed)
            references += len(governed)  # CTE names and row generators cost DuckDB's planner little
    if references > MAX_TABLE_REFERENCES:
        raise _invalid(
            f"The query reads tables {references} times; lakegate plans at most {MAX_TABLE_REFERENCES}.",
            "Aggregate in a CTE once and join its result, instead of joining a table to itself many times.",
        )
    _require_round_trip(tree)
    return GuardedQuery(sql, tree, tuple(sorted(tables)), ordered=tree.args.get("order") is not None)


_ROUND_TRIP = (
    "lakegate cannot run this query safely: part of it (a quoted type, unit, collation or argument) does not "
    "read back as written.",
    "Use built-in type names, plain EXTRACT units (year, month, ...), numeric type arguments and collation "
    "names without quotes (COLLATE nocase).",
)


def _require_round_trip(tree: exp.Expr) -> None:
    """Refuse a tree whose SQL, as generated for DuckDB, reads back as another tree.

    sqlglot writes some names back verbatim (an unknown type, an EXTRACT unit, a type's argument,
    a COLLATE string): a quoted name holding SQL would become SQL in the statement that runs,
    outside what the guard checked. What runs is generated from the tree, so it must be the tree.

    Raises:
        InvalidQuery: the generated SQL parses into something else.
    """
    try:
        same = _signature(sqlglot.parse_one(tree.sql(DIALECT, comments=False), dialect=DIALECT)) == _signature(tree)
    except (SqlglotError, RecursionError):
        same = False
    if not same:
        raise _invalid(*_ROUND_TRIP)


def _signature(tree: exp.Expr) -> Counter[tuple[str, str]]:
    """What a query reads and calls, as a multiset: unknown functions (by name), tables, queries and
    columns. sqlglot may rewrite the shape of a known construct when it writes it out (a struct_pack
    as a {...} literal), never what it reads or calls: text smuggled in through a name it writes
    back verbatim changes this."""
    found: Counter[tuple[str, str]] = Counter()
    for node in tree.walk():
        if isinstance(node, exp.Anonymous):
            found["function", str(node.name).lower()] += 1
        elif isinstance(node, exp.Table):
            found["table", node.sql(DIALECT, comments=False).lower()] += 1  # the text run has no comments
        elif isinstance(node, exp.Column):
            found["column", str(node.name).lower()] += 1
        elif isinstance(node, exp.Select | exp.Subquery | exp.SetOperation | exp.CTE):
            found["query", type(node).__name__] += 1
    return found


def _check_table(node: exp.Table) -> set[str]:
    if not isinstance(node.this, exp.Identifier):
        name = _function_name(node.this) if isinstance(node.this, exp.Func) else node.this.sql(DIALECT)
        if name in TABLE_FUNCTIONS:
            return set()
        raise _invalid(
            f"The table function {name}() is not allowed: lakegate queries read governed tables only.",
            "Name a table as namespace.table; list_datasets shows them.",
        )
    extra = {key for key, value in node.args.items() if value and key not in _TABLE_ARGS}
    if extra:
        raise _invalid(
            f"Table {node.sql(DIALECT)} uses {', '.join(sorted(extra))}, which lakegate does not support.",
            "For time travel pass as_of to the query tool; otherwise name the table plainly.",
        )
    name = table_name(node)
    if name is None:
        if _names_cte(node):
            return set()
        raise _invalid(
            f"There is no table named '{node.name}'. Name tables as namespace.table, e.g. sales.orders.",
            "Call list_datasets to see the tables you can query.",
        )
    return {name}


# -- column resolution ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TableColumns:
    """The columns of one governed table as the caller may see them."""

    types: Mapping[str, str]  # visible column -> DuckDB type, in table order
    hidden: frozenset[str]  # columns the caller may not read at all


def _schema(tables: Mapping[str, TableColumns]) -> dict[str, object]:
    schema: dict[str, Any] = {}
    for name, columns in tables.items():
        catalog, namespace, table = _name_parts(name)
        schema.setdefault(catalog, {}).setdefault(namespace, {})[table] = dict(columns.types)
    return schema


def _in_catalogs(tree: exp.Expr) -> exp.Expr:
    """`tree` with every two-part table reference placed in the embedded catalog, so that it never
    resolves to an attached catalog's table of the same namespace and name."""
    for table in tree.find_all(exp.Table):
        if table.db and not table.args.get("catalog") and isinstance(table.this, exp.Identifier):
            table.set("catalog", exp.to_identifier(EMBEDDED_CATALOG, quoted=True))
    return tree


@dataclass(frozen=True)
class ResolvedColumns:
    read: dict[str, set[str]]  # "namespace.table" -> the visible columns the query reads
    scopes: list[Scope]  # of the query with every column qualified by its source (sql_filters uses them)


def resolve_columns(query: GuardedQuery, tables: Mapping[str, TableColumns]) -> ResolvedColumns:
    """The visible columns of each governed table the query reads (with `*` expanded).

    Raises:
        PolicyDenied: the query names a column hidden from the caller (the message names it).
        InvalidQuery: a column does not exist, is ambiguous, or the query cannot be resolved.
    """
    try:
        qualified = qualify(
            _in_catalogs(query.tree.copy()), schema=_schema(tables), dialect=DIALECT, validate_qualify_columns=True
        )
        scopes = traverse_scope(qualified)
    except OptimizeError as exc:
        raise _column_error(str(exc), query, tables) from exc
    except (SqlglotError, RecursionError, KeyError, ValueError) as exc:
        raise _invalid(
            f"lakegate could not work out which columns this query reads: {exc}",
            "Write it with plain SELECT syntax, qualifying columns with table aliases.",
        ) from exc

    read: dict[str, set[str]] = {name: set() for name in query.tables}
    for scope in scopes:
        sources = {alias: source for alias, source in scope.sources.items() if isinstance(source, exp.Table)}
        for column in scope.columns:
            source = sources.get(column.table)
            if source is not None and (name := table_name(source)) in read:
                read[name].add(_source_column(source, column.name.lower(), tables[name]))
        # Some forms read columns that sqlglot does not name: COLUMNS('regex'), #n, a star it leaves
        # unexpanded ("* LIKE '%mail%'"), a PIVOT (every other column is a group key) and a bare
        # alias that is the whole row ("to_json(c)"). Count every visible column of the source read.
        projections = scope.expression.expressions if isinstance(scope.expression, exp.Select) else []
        stars = (star for projection in projections for star in projection.find_all(exp.Star))
        # A positional reference (#3) reads a column by place: count the whole row, too.
        pattern = scope.expression.find(exp.Columns, exp.PositionalColumn) is not None or any(
            not isinstance(star.parent, exp.Func) for star in stars
        )
        whole_rows = {
            str(node.name) for node in scope.expression.find_all(exp.TableColumn)
            if node.find_ancestor(exp.Select) is scope.expression
        }  # fmt: skip
        for alias, source in sources.items():
            if (name := table_name(source)) in read and (pattern or alias in whole_rows or source.args.get("pivots")):
                read[name].update(tables[name].types)
    return ResolvedColumns(read, scopes)


def _source_column(source: exp.Table, column: str, columns: TableColumns) -> str:
    """The table's own name for `column`, which an alias list ("sales.customers AS c(id, n)") renames
    by position: the rewritten scan lists the visible columns in table order, so position i is the
    i-th visible column.

    Raises:
        InvalidQuery: the alias list names more columns than the caller can see.
    """
    alias = source.args.get("alias")
    renamed = [str(identifier.name).lower() for identifier in alias.columns] if alias is not None else []
    if column not in renamed:
        return column
    visible = list(columns.types)
    position = renamed.index(column)
    if position >= len(visible):
        raise _invalid(
            f"The alias of {source.sql(DIALECT)} names {len(renamed)} columns; you can see {len(visible)}.",
            "Name at most as many columns in the alias as describe_dataset lists for you.",
        )
    return visible[position]


def _column_error(message: str, query: GuardedQuery, tables: Mapping[str, TableColumns]) -> Exception:
    match = _UNRESOLVED.search(message)
    column = match.group(1).lower() if match else None
    owners = [name for name in query.tables if column and column in tables[name].hidden]
    if column and owners:
        return PolicyDenied(
            f"The query reads column {owners[0]}.{column}, which is hidden from you by policy.",
            hint="Remove that column from the query; describe_dataset shows which columns you may read.",
        )
    text = message.split(". Line:", 1)[0]
    return _invalid(
        f"The query names a column that does not exist or is ambiguous: {text}.",
        "Call describe_dataset for the table's columns, and qualify shared names with a table alias.",
    )


# -- rewriting -----------------------------------------------------------------------------------


def rewrite(query: GuardedQuery, scans: Mapping[str, str], *, masks: Mapping[str, str] | None = None) -> GovernedSql:
    """The query with every governed table replaced by its governed scan (SQL of a SELECT), as the
    tree each engine renders (policies/governed_sql.py). `masks` maps each mask function name the
    scans call to its method.

    The scans read from placeholder names that each engine names its own way (the query worker's
    relation of hundreds of planned files, a Spark view): sqlglot then never parses or copies the
    file lists, which would cost more than the rest of the rewrite.

    Raises:
        InvalidQuery: a scan does not parse (a bug, refused rather than run), or the rewritten SQL
            does not read back as the tree it was written from, or does not pass the guard's checks.
    """
    tree = query.tree.copy()
    try:
        parsed = {name: sqlglot.parse_one(sql, dialect=DIALECT) for name, sql in scans.items()}
    except ParseError as exc:
        raise _invalid(f"A governed scan does not parse: {exc}") from exc
    _name_subquery_columns(tree)
    for table in list(tree.find_all(exp.Table)):
        name = table_name(table) if isinstance(table.this, exp.Identifier) else None
        if name is None:
            continue
        if name not in parsed:
            raise _invalid(f"Table {name} has no governed scan.")
        alias = table.args.get("alias") or exp.TableAlias(this=exp.to_identifier(table.name))
        subquery = exp.Subquery(this=parsed[name].copy(), alias=alias.copy())
        if table.args.get("pivots"):
            subquery.set("pivots", table.args["pivots"])
        table.replace(subquery)
    # "sales.orders.region" addressed the table by its full name; after the rewrite it is "orders".
    for column in tree.find_all(exp.Column):
        if column.args.get("db") is None:
            continue
        full = f"{column.catalog}.{column.db}.{column.table}" if column.catalog else f"{column.db}.{column.table}"
        if full.lower() in parsed:
            column.set("db", None)
            column.set("catalog", None)
    # Without comments: what runs is exactly the tree that was checked (the original, comments
    # included, is in the audit record).
    text = tree.sql(DIALECT, comments=False)
    sources = {table.name for scan in parsed.values() for table in scan.find_all(exp.Table)}
    by_name = {name.lower(): method for name, method in (masks or {}).items()}
    checked = GovernedSql(_require_same_checks(tree, text, sources, set(by_name)), by_name)
    if checked.sql != text:
        # A few constructs read back as another spelling of themselves (date_add(d, 1) is written
        # d + INTERVAL 1 DAY, read and written again as INTERVAL '1' DAY): check that spelling too.
        text = checked.sql
        checked = GovernedSql(_require_same_checks(checked.tree, text, sources, set(by_name)), by_name)
    if checked.sql != text:  # DuckDB runs the checked tree's own rendering, which is the text checked
        raise _invalid(*_ROUND_TRIP)
    return checked


def _require_same_checks(tree: exp.Expr, text: str, sources: set[str], masks: set[str]) -> exp.Query:
    """Read the generated SQL again: it must be the tree it was generated from, and pass the checks
    the agent's query passed. Returns that reading, which is what runs.

    So what runs holds no forbidden statement or function, calls masks only by this call's names
    (`masks`) and only on a column (on anything else a mask is a hash oracle), and names no table
    but the governed scans' sources and the CTEs in scope where they are named. DuckDB's own
    reading is checked again in the query worker.

    Raises:
        InvalidQuery: the text reads as something else, or as something the guard refuses.
    """
    refusal = _invalid(*_ROUND_TRIP)
    try:
        again = sqlglot.parse_one(text, dialect=DIALECT)
    except (SqlglotError, RecursionError):
        raise refusal from None
    if _signature(again) != _signature(tree):
        raise refusal
    for node in again.walk():
        if isinstance(node, _FORBIDDEN_NODES) or (
            isinstance(node, exp.DataType) and node.this == exp.DataType.Type.USERDEFINED
        ):
            raise refusal
        if isinstance(node, exp.Func) and _function_name(node).startswith(MACRO_PREFIX):
            if not (
                _function_name(node) in masks
                and isinstance(node, exp.Anonymous)
                and len(node.expressions) == 1
                and isinstance(node.expressions[0], exp.Column)
            ):
                raise refusal
        elif isinstance(node, exp.Func):
            try:
                _check_function(node)
            except InvalidQuery:
                raise refusal from None
        if (
            isinstance(node, exp.Table)
            and isinstance(node.this, exp.Identifier)
            and (node.db or node.catalog or (node.name not in sources and not _names_cte(node)))
        ):
            raise refusal
    if not isinstance(again, exp.Query):
        raise refusal
    return again


def _name_subquery_columns(tree: exp.Expr) -> None:
    """Alias every unaliased output column that holds a subquery with the agent's own text of it.

    DuckDB names such a column after the SQL that ran, which after the rewrite is the governed scan
    (its masks, row filters and relations), not what the agent wrote.
    """
    unnamed = [
        projection
        for select in tree.find_all(exp.Select)
        for projection in select.expressions
        if not isinstance(projection, exp.Alias | exp.Star) and projection.find(exp.Query) is not None
    ]
    names = [projection.sql(DIALECT, comments=False) for projection in unnamed]  # before any is changed
    for projection, name in zip(unnamed, names, strict=True):
        alias = exp.Alias(alias=exp.to_identifier(name, quoted=True))
        projection.replace(alias)
        alias.set("this", projection)
