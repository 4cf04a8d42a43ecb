"""Governed SQL rendered for Apache Spark, and the functions Spark may run of it.

The SQL guard parses, checks and rewrites an agent's query once, into one tree with a placeholder per
table and a per-call name per mask (policies/sql_guard.py, policies/governed_sql.py). When the
query runs on Spark (catalog/spark_engine.py), that tree is rendered in Spark's dialect by sqlglot,
with the session's views and mask functions named in it, and `unsupported_level=RAISE`: a construct
sqlglot cannot express for Spark is refused with a clear error, never dropped from the query (a
dropped WHERE would widen what a row filter lets through).

Spark is no sandbox: `reflect` and `java_method` call any Java method, `input_file_name` shows the
server's paths, `raise_error` carries a message of the query's choosing. So the rendered SQL is read
again, in Spark's dialect, and every function in it must be on `SPARK_FUNCTIONS`, a reviewed
allow-list (new Spark functions are refused until someone adds them; tests/test_spark_sql.py holds
the list to a snapshot), or be one of the call's own mask functions.

That is sqlglot's reading. The second wall is Spark's own: before a query runs, its analysed plan
(what Spark's analyser resolved the SQL to, every function by its name) is read by `check_spark_plan`,
and every call in it must be on the same allow-list, or be one of the few expressions the analyser
prints as calls (window frames, lambdas, outer references: `PLAN_EXPRESSIONS`). So SQL that sqlglot
and Spark read differently still cannot call a function nobody reviewed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import sqlglot
import structlog
from sqlglot import exp
from sqlglot.errors import ErrorLevel, SqlglotError

from lakegate.errors import ConfigurationError, GovernanceViolation, InvalidQuery
from lakegate.policies.governed_sql import GovernedSql

__all__ = ["PLAN_EXPRESSIONS", "SPARK_FUNCTIONS", "check_spark_functions", "check_spark_plan", "to_spark"]

log = structlog.get_logger(__name__)

#: Functions of Spark 4 that compute a value from their arguments and nothing else: no files, no
#: Java, no session or cluster state, no error text of the query's choosing.
SPARK_FUNCTIONS = frozenset(
    {
        # Aggregates and window functions
        "any", "any_value", "approx_count_distinct", "approx_percentile", "array_agg", "avg", "bit_and",
        "bit_or", "bit_xor", "bool_and", "bool_or", "collect_list", "collect_set", "corr", "count",
        "count_if", "covar_pop", "covar_samp", "cume_dist", "dense_rank", "every", "first", "first_value",
        "grouping", "grouping_id", "kurtosis", "lag", "last", "last_value", "lead", "listagg", "max", "max_by",
        "mean", "median", "min", "min_by", "mode", "nth_value", "ntile", "percent_rank", "percentile",
        "percentile_approx", "percentile_cont", "percentile_disc", "rank", "regr_avgx", "regr_avgy",
        "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy",
        "row_number", "skewness", "some", "std", "stddev", "stddev_pop", "stddev_samp", "string_agg", "sum",
        "try_avg", "try_sum", "var_pop", "var_samp", "variance",
        # Conditionals and casts
        "case", "cast", "try_cast", "coalesce", "if", "ifnull", "nullif", "nullifzero", "nvl", "nvl2",
        "zeroifnull", "greatest", "least", "isnull", "isnotnull", "isnan", "nanvl", "equal_null", "in",
        "between", "not", "and", "or", "like", "ilike", "rlike", "regexp", "regexp_like", "exists",
        "bigint", "boolean", "date", "decimal", "double", "float", "int", "smallint", "string", "timestamp",
        "tinyint", "binary",
        # Numbers
        "abs", "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "bin", "bround", "cbrt", "ceil",
        "ceiling", "conv", "cos", "cosh", "cot", "csc", "degrees", "div", "e", "exp", "expm1", "factorial",
        "floor", "hypot", "ln", "log", "log10", "log1p", "log2", "mod", "negative", "pi", "pmod", "positive",
        "pow", "power", "radians", "rint", "round", "sec", "sign", "signum", "sin", "sinh", "sqrt", "tan",
        "tanh", "try_add", "try_divide", "try_mod", "try_multiply", "try_subtract", "width_bucket",
        "bit_count", "bit_get", "getbit", "shiftleft", "shiftright", "shiftrightunsigned", "format_number",
        "to_number", "try_to_number", "rand", "random", "randn",
        # Text and bytes
        "ascii", "base64", "bit_length", "btrim", "char", "char_length", "character_length", "chr", "concat",
        "concat_ws", "contains", "crc32", "decode", "elt", "encode", "endswith", "find_in_set",
        "format_string", "hex", "initcap", "instr", "lcase", "left", "len", "length", "levenshtein",
        "locate", "lower", "lpad", "ltrim", "md5", "octet_length", "overlay", "position", "printf",
        "regexp_count", "regexp_extract", "regexp_extract_all", "regexp_instr", "regexp_replace",
        "regexp_substr", "repeat", "replace", "reverse", "right", "rpad", "rtrim", "sha", "sha1", "sha2",
        "soundex", "space", "split", "split_part", "startswith", "substr", "substring", "substring_index",
        "to_char", "to_varchar", "translate", "trim", "ucase", "unbase64", "unhex", "upper", "hash",
        "xxhash64", "url_decode", "url_encode", "parse_url", "to_binary", "try_to_binary",
        # Dates and times
        "add_months", "curdate", "current_date", "current_timestamp", "date_add", "date_diff",
        "date_format", "date_from_unix_date", "date_part", "date_sub", "date_trunc", "dateadd", "datediff",
        "datepart", "day", "dayname", "dayofmonth", "dayofweek", "dayofyear", "extract", "from_unixtime",
        "from_utc_timestamp", "hour", "last_day", "make_date", "make_dt_interval", "make_interval",
        "make_timestamp", "make_timestamp_ntz", "make_ym_interval", "minute", "month", "monthname",
        "months_between", "next_day", "now", "quarter", "second", "timestamp_micros", "timestamp_millis",
        "timestamp_seconds", "to_date", "to_timestamp", "to_timestamp_ntz", "to_unix_timestamp",
        "to_utc_timestamp", "trunc", "try_to_date", "try_to_timestamp", "unix_date", "unix_micros",
        "unix_millis", "unix_seconds", "unix_timestamp", "weekday", "weekofyear", "year", "interval",
        "localtimestamp", "convert_timezone", "current_timezone",
        # Arrays, maps and structs built from the query's own values
        "array", "array_append", "array_compact", "array_contains", "array_distinct", "array_except",
        "array_insert", "array_intersect", "array_join", "array_max", "array_min", "array_position",
        "array_prepend", "array_remove", "array_repeat", "array_size", "array_sort", "array_union",
        "arrays_overlap", "arrays_zip", "cardinality", "element_at", "explode", "explode_outer", "filter",
        "flatten", "forall", "inline", "inline_outer", "map", "map_concat", "map_contains_key", "map_entries",
        "map_from_arrays", "map_from_entries", "map_keys", "map_values", "named_struct", "posexplode",
        "posexplode_outer", "sequence", "size", "slice", "sort_array", "struct", "transform",
        "try_element_at", "get", "aggregate", "reduce", "get_json_object", "json_array_length",
        "json_object_keys", "to_json", "from_json",
    }
)  # fmt: skip

#: Spark reads these words as functions when written without parentheses, where no column has the name.
BARE_FUNCTIONS = frozenset(
    {"current_user", "user", "session_user", "current_database", "current_schema", "current_catalog",
     "current_path", "current_time", "localtime"}
)  # fmt: skip
#: What Spark's analysed plan prints as `name(...)` that no query can call by that name: parts of a
#: window, of a lambda, of a subquery (and the names Spark gives such columns), of a PIVOT, LIKE
#: ANY/ALL, date arithmetic with a unit (DATEDIFF(DAY, ...) is Spark's syntax, not a function), an
#: interval's conversion the analyser adds, and the types of a JSON schema. None is a function of
#: Spark's registry (tests/test_spark_sql.py checks that against a live cluster's SHOW FUNCTIONS).
#: A PIVOT's generated column names (`__pivot_sum(amount)`) are read as the aggregate they name.
PLAN_EXPRESSIONS = frozenset(
    {"windowspecdefinition", "specifiedwindowframe", "lambdafunction", "namedlambdavariable", "outer",
     "extractansiintervaldays", "pivotfirst", "likeany", "likeall", "notlikeany", "notlikeall",
     "structtype", "structfield", "stringtype", "arraytype", "maptype", "decimaltype", "chartype",
     "varchartype", "daytimeintervaltype", "yearmonthintervaltype", "scalarsubquery", "listquery",
     "timestampadd", "timestampdiff"}
)  # fmt: skip
_PLAN_ALLOWED = SPARK_FUNCTIONS | PLAN_EXPRESSIONS
_PIVOT_COLUMN = "__pivot_"
#: Spark's EXPLAIN EXTENDED, in this order; each header exactly once, or the sections are not known.
PLAN_HEADERS = (
    "== Parsed Logical Plan ==",
    "== Analyzed Logical Plan ==",
    "== Optimized Logical Plan ==",
    "== Physical Plan ==",
)
#: A call in plan text, with any qualifier: `db.f(` is not `f(` (a catalog function of that name).
_PLAN_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\(")
#: Spark's marks of a plan cut short (settings: spark.sql.debug.maxToStringFields, maxPlanStringLength).
_TRUNCATED = re.compile(r"\.\.\. \d+ more (?:fields|characters)")
#: sqlglot's functions that Spark reads as operators or keywords, not as calls by name.
_OPERATORS = (exp.Connector, exp.Case, exp.CurrentDate, exp.CurrentTimestamp)
_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def _spark_name(node: exp.Func) -> str | None:
    """The function Spark calls for `node`, or None for an operator (AND, CASE, IN: its operands are
    checked on their own)."""
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    generated = _CALL.match(node.sql("spark"))
    return generated.group(1).lower() if generated else None


def check_spark_functions(sql: str, own_functions: Collection[str] = (), tables: Collection[str] = ()) -> None:
    """Refuse Spark SQL that calls a function off the allow-list (`own_functions`: the call's masks)
    or reads a table other than `tables` and its own CTEs.

    Raises:
        InvalidQuery: the SQL calls such a function or names such a table, or Spark's dialect cannot
            read it back.
    """
    own = {name.lower() for name in own_functions}
    try:
        tree = sqlglot.parse_one(sql, read="spark")
    except SqlglotError as exc:
        raise InvalidQuery(
            "The query could not be rendered for Spark.", hint="Simplify the query, or ask for it on DuckDB."
        ) from exc
    readable = {name.lower() for name in tables} | {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    for node in tree.walk():
        if isinstance(node, exp.Func):
            name = _spark_name(node)
            if name is None and not isinstance(node, _OPERATORS):
                name = type(node).__name__.lower()  # a call sqlglot writes without parentheses
            if name is not None and name not in SPARK_FUNCTIONS and name not in own:
                raise InvalidQuery(
                    f"The function {name}() is not available when a query runs on Spark.",
                    hint="Use plain SQL functions (aggregates, arithmetic, text and date functions).",
                )
        elif isinstance(node, exp.Column) and not node.table and node.name.lower() in BARE_FUNCTIONS:
            raise InvalidQuery(
                f"{node.name} is not available when a query runs on Spark.",
                hint=f"Qualify a column of that name with its table (t.{node.name}).",
            )
        elif isinstance(node, exp.Table) and (node.args.get("db") or node.name.lower() not in readable):
            # A path read (parquet.`/x`) or any relation the gate did not hand this call.
            raise InvalidQuery(
                "The query names a relation that is not a governed table, which Spark may not read.",
                hint="Read governed tables by their dataset names (namespace.table).",
            )


def to_spark(statement: GovernedSql, views: Mapping[str, str], functions: Mapping[str, str]) -> str:
    """The governed statement as Spark SQL, checked against the allow-list.

    Rendered from a copy of the statement's tree: each placeholder table becomes its view in `views`,
    each mask call the session's function of its method in `functions` over the value as text (the
    DuckDB macros' input), or for a `null` mask a NULL of the column's own type (as the DuckDB
    macro: CASE WHEN false THEN x END).

    Raises:
        InvalidQuery: sqlglot cannot express a part of the query in Spark's dialect (it is refused
            rather than dropped), or the rendering calls a function off the allow-list.
    """

    def render(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Table) and not node.args.get("db") and node.name in views:
            view = node.copy()
            view.set("this", exp.to_identifier(views[node.name], quoted=True))
            return view
        if isinstance(node, exp.Anonymous) and str(node.name).lower() in statement.masks:
            method = statement.masks[str(node.name).lower()]
            (argument,) = node.expressions
            if method == "null":
                return exp.Case(ifs=[exp.If(this=exp.false(), true=argument.copy())])
            if method not in functions:
                raise ConfigurationError(f"the Spark session has no function for the {method!r} mask")
            return exp.Anonymous(this=functions[method], expressions=[exp.cast(argument.copy(), "STRING")])
        return node

    try:
        # Two passes: a node the second replaces is not visited further, so views and masks inside
        # it must already be named.
        tree = statement.tree.transform(render).transform(_cast_inside_explode, copy=False)
        sql = tree.sql(dialect="spark", unsupported_level=ErrorLevel.RAISE)
    except SqlglotError as exc:
        raise InvalidQuery(
            f"This query cannot run on Spark: {_first_line(str(exc))}",
            hint="Rewrite that part of the query with plain SQL (the Spark engine serves this table).",
        ) from exc
    if "${" in sql:  # the session turns variable substitution off; nor does the SQL ever ask for it
        raise InvalidQuery(
            "The query holds ${, which Spark reads as a variable to substitute, so it cannot run on Spark.",
            hint="Write the text differently (e.g. concat('$', '{')).",
        )
    check_spark_functions(sql, own_functions=functions.values(), tables=views.values())
    return sql


def _cast_inside_explode(node: exp.Expr) -> exp.Expr:
    """`CAST(unnest(list) AS t)` as `unnest(list_transform(list, x -> CAST(x AS t)))`: Spark runs a
    generator only as a whole select item (the metric compiler's series of periods casts one)."""
    if not isinstance(node, exp.Cast) or not isinstance(node.this, exp.Explode):
        return node
    if node.this.expressions:  # unnest(x, max_depth := 2): not a plain list
        raise InvalidQuery("This query cannot run on Spark: unnest with options.", hint="Unnest a plain list.")
    element = exp.to_identifier("lakegate_element")
    cast = exp.Lambda(this=exp.Cast(this=element.copy(), to=node.args["to"].copy()), expressions=[element])
    return exp.Explode(this=exp.Transform(this=node.this.this.copy(), expression=cast))


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unsupported construct"


def plan_sections(explained: str) -> tuple[str, str]:
    """The analysed and the physical plan of Spark's `EXPLAIN EXTENDED` output.

    Raises:
        InvalidQuery: a header is not there exactly once, in order (text of the query spells one,
            so the sections cannot be told apart: refused rather than guessed).
    """
    starts = [explained.find(header) for header in PLAN_HEADERS]
    if any(explained.count(header) != 1 for header in PLAN_HEADERS) or starts != sorted(starts):
        raise InvalidQuery(
            "The query holds text that spells a header of Spark's plans (== ... Plan ==), which Spark cannot run here.",
            hint="Write that text differently.",
        )
    analysed = explained[starts[1] + len(PLAN_HEADERS[1]) : starts[2]]
    return analysed, explained[starts[3] + len(PLAN_HEADERS[3]) :]


def check_spark_plan(analysed: str, sql: str, own_functions: Collection[str] = ()) -> None:
    """Refuse a query whose analysed plan calls a function off the allow-list.

    `analysed` is Spark's analysed plan of `sql` (plan_sections). Every `name(` in it must be an
    allowed function, an expression of `PLAN_EXPRESSIONS` or one of `own_functions` (the call's
    masks), and the plan must be whole. Text of the query prints in the plan too (a string
    'Report(2024)', a column alias), so what the query's own strings or names spell is refused as a
    client error that says so; anything else is a disagreement between sqlglot and Spark, refused
    as a governance violation.

    Raises:
        InvalidQuery: the query's text spells a call that is not allowed, or a mark of a cut plan.
        GovernanceViolation: Spark's plan calls a function that sqlglot's reading did not show, or
            the plan is cut short (so it cannot be checked whole).
    """
    allowed = _PLAN_ALLOWED | {name.lower() for name in own_functions}
    called = {match.group(1).lower().removeprefix(_PIVOT_COLUMN) for match in _PLAN_CALL.finditer(analysed)}
    refused = [f"{name}(" for name in sorted(called - allowed)]
    refused += sorted({match.group(0) for match in _TRUNCATED.finditer(analysed)})
    if not refused:
        return
    spelt = _query_text(sql)
    for found in refused:
        if found.lower() not in spelt:
            raise GovernanceViolation(f"Spark's analysed plan holds {found!r}, which the rendering should have refused")
    # Refused all the same; logged, since text spelling a call could also hide a real one from the alert.
    log.warning("spark.plan_check_refused_spelt_call", found=refused)
    raise InvalidQuery(
        f"Spark reads {refused[0]!r} in this query as a call of a function that is not available on Spark "
        "(text in a string or a column name that looks like a call counts too).",
        hint="Write that text differently (a space before the parenthesis, or built with concat('name', "
        "'(...)')), or use plain SQL functions.",
    )


def _query_text(sql: str) -> str:
    """The strings and names of `sql`, lower case, as one text (what the plan may print of them)."""
    try:
        tree = sqlglot.parse_one(sql, read="spark")
    except SqlglotError:
        return ""
    parts = [str(node.this) for node in tree.walk() if isinstance(node, exp.Literal | exp.Identifier)]
    return "\n".join(parts).lower()
