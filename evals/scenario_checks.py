"""What an agent-eval step may expect of a result, and the checks that hold for every result.

A `ValueCheck` names a path into a tool's structured result and what the values found there must
be. Paths are dotted names with list selectors: `datasets[0].name`, `rows[*][1]` (every row),
`columns[name=email].access` (items whose `name` is `email`); a key with dots or dashes goes in
brackets: `row_filters[sales.orders]`. A result with `columns` and `rows`
(query, query_metrics) also offers `records`: its rows as objects by column name, so that
`records[0].n` reads column `n` of the first row.

Data fields are the parts of a result that hold what was read from the warehouse: the cells of
`rows` and the `content` and `title` of document passages. Everything else (the text around the
data, error messages, tool descriptions, the server's instructions) is lakegate speaking, and must
never read as an instruction to the agent (`INSTRUCTION_PATTERNS`). Prompt injection planted in the
demo data must reach the agent only inside data fields (`check_planted`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "INSTRUCTION_PATTERNS",
    "ValueCheck",
    "all_strings",
    "check_planted",
    "check_value",
    "data_strings",
    "instruction_like",
    "non_data_problem",
    "non_data_strings",
    "resolve",
]

#: Phrases by which text tells an agent what to do instead of what it asked for. lakegate's own
#: text (descriptions, instructions, errors, renderings) never contains them.
INSTRUCTION_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"\bignore\s+(all\s+|any\s+)?(the\s+)?(previous|prior|above|earlier)\b",
        r"\bdisregard\s+(all\s+|any\s+)?(the\s+)?(previous|prior|above|earlier)\b",
        r"\byou\s+must\s+(now\s+|first\s+)?call\b",
        r"\bnew\s+instructions\b",
        r"\bdo\s+not\s+tell\s+the\s+user\b",
    )
)

#: Structured-result paths that hold retrieved data.
DATA_PATHS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^rows\[\d+\]\[\d+\]$"),
    re.compile(r"^passages\[\d+\]\.(content|title)$"),
)

_TOKEN = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[([^\]]*)\]")


class ValueCheck(BaseModel):
    """One expectation on the values at a path of a structured result.

    Every comparison given must hold for every value found, and at least one value must be found
    (unless `present: false` or `count: 0`). Numbers compare by value: "874146.25" equals 874146.25.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Where to look, e.g. records[0].n or columns[name=email].access.")
    equals: Any = None
    not_equals: Any = None
    gt: Any = None
    gte: Any = None
    lt: Any = None
    lte: Any = None
    contains: Any = Field(default=None, description="A substring of a string, or an item of a list.")
    not_contains: Any = None
    matches: str | None = Field(default=None, description="A regular expression the string value matches.")
    one_of: list[Any] | None = None
    length: int | None = Field(default=None, description="Length of the string or list value.")
    count: int | None = Field(default=None, description="How many values the path finds.")
    present: bool | None = Field(default=None, description="Whether the path finds anything.")
    tolerance: float = Field(default=0.0, ge=0, description="Allowed difference for numeric equals.")


def _records(document: dict[str, Any]) -> list[dict[str, Any]] | None:
    columns, rows = document.get("columns"), document.get("rows")
    if not isinstance(columns, list) or not isinstance(rows, list):
        return None
    names = [str(column.get("name")) if isinstance(column, dict) else "" for column in columns]
    return [dict(zip(names, row, strict=False)) for row in rows if isinstance(row, list)]


def _step(value: Any, name: str | None, selector: str | None) -> Iterator[Any]:
    if name is not None:
        if isinstance(value, dict):
            if name in value:
                yield value[name]
            elif name == "records" and (records := _records(value)) is not None:
                yield records
        return
    assert selector is not None
    if isinstance(value, dict):
        if selector in value:  # a key that is no name: masked_columns[sales.customers.email]
            yield value[selector]
        return
    if not isinstance(value, list):
        return
    if selector == "*":
        yield from value
    elif re.fullmatch(r"-?\d+", selector):
        index = int(selector)
        if -len(value) <= index < len(value):
            yield value[index]
    elif "=" in selector:
        key, wanted = selector.split("=", 1)
        yield from (item for item in value if isinstance(item, dict) and str(item.get(key)) == wanted)


def resolve(document: Any, path: str) -> list[Any]:
    """Every value at `path` in `document` (see the module docstring); [] when there is none.

    Raises:
        ValueError: the path does not parse.
    """
    tokens = list(_TOKEN.finditer(path))
    if not tokens or "".join(t.group(0) for t in tokens) != path or path.startswith("."):
        raise ValueError(f"cannot parse path {path!r}: use names, [index], [*] and [key=value]")
    values = [document]
    for token in tokens:
        values = [found for value in values for found in _step(value, token.group(1), token.group(2))]
    return values


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | Decimal | str):
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _same(actual: Any, expected: Any, tolerance: float = 0.0) -> bool:
    a, b = _number(actual), _number(expected)
    if a is not None and b is not None:
        return abs(a - b) <= Decimal(str(tolerance))
    return bool(actual == expected)


def _order(actual: Any, bound: Any) -> int | None:
    a, b = _number(actual), _number(bound)
    if a is not None and b is not None:
        return (a > b) - (a < b)
    if isinstance(actual, str) and isinstance(bound, str):
        return (actual > bound) - (actual < bound)
    return None


def _contains(actual: Any, wanted: Any) -> bool:
    if isinstance(actual, str):
        return str(wanted).lower() in actual.lower()
    if isinstance(actual, list):
        return any(_same(item, wanted) for item in actual)
    if isinstance(actual, dict):
        return wanted in actual
    return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _problem(check: ValueCheck, value: Any) -> str | None:
    """Why `value` fails `check`, or None."""
    given = check.model_fields_set
    comparisons = {"gt": (1,), "gte": (0, 1), "lt": (-1,), "lte": (-1, 0)}
    if "equals" in given and not _same(value, check.equals, check.tolerance):
        return f"expected {_short(check.equals)}, got {_short(value)}"
    if "not_equals" in given and _same(value, check.not_equals):
        return f"expected anything but {_short(check.not_equals)}"
    for op, allowed in comparisons.items():
        if op in given:
            order = _order(value, getattr(check, op))
            if order not in allowed:
                return f"expected {op} {_short(getattr(check, op))}, got {_short(value)}"
    if "contains" in given and not _contains(value, check.contains):
        return f"expected it to contain {_short(check.contains)}, got {_short(value)}"
    if "not_contains" in given and _contains(value, check.not_contains):
        return f"expected it not to contain {_short(check.not_contains)}, got {_short(value)}"
    if check.matches is not None and not (isinstance(value, str) and re.search(check.matches, value)):
        return f"expected a match of /{check.matches}/, got {_short(value)}"
    if check.one_of is not None and not any(_same(value, option) for option in check.one_of):
        return f"expected one of {_short(check.one_of)}, got {_short(value)}"
    if check.length is not None and (not isinstance(value, str | list | dict) or len(value) != check.length):
        size = len(value) if isinstance(value, str | list | dict) else "no length"
        return f"expected length {check.length}, got {size}"
    return None


def check_value(document: Any, check: ValueCheck) -> str | None:
    """Why `document` fails `check` (a sentence naming the path, the expected and the actual value), or None."""
    try:
        values = resolve(document, check.path)
    except ValueError as exc:
        return str(exc)
    if check.count is not None and len(values) != check.count:
        return f"{check.path}: expected {check.count} value(s), found {len(values)}"
    if check.present is not None and bool(values) != check.present:
        found = _short(values[0]) if values else "nothing"
        return f"{check.path}: expected {'a value' if check.present else 'nothing'}, found {found}"
    if not values:
        return None if check.present is False or check.count == 0 else f"{check.path}: nothing there"
    for index, value in enumerate(values):
        problem = _problem(check, value)
        if problem is not None:
            where = check.path if len(values) == 1 else f"{check.path} (value {index + 1} of {len(values)})"
            return f"{where}: {problem}"
    return None


def all_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, string) for every string in a JSON value, paths as `resolve` reads them."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from all_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from all_strings(item, f"{path}[{index}]")


def _is_data(path: str) -> bool:
    return any(pattern.match(path) for pattern in DATA_PATHS)


def data_strings(structured: Any) -> list[str]:
    """The strings of a structured result that are retrieved data."""
    return [text for path, text in all_strings(structured) if _is_data(path)]


def non_data_strings(structured: Any) -> list[tuple[str, str]]:
    """(path, string) for every string of a structured result that is not retrieved data."""
    return [(path, text) for path, text in all_strings(structured) if not _is_data(path)]


def instruction_like(text: str) -> str | None:
    """The first instruction-like phrase in `text`, or None."""
    for pattern in INSTRUCTION_PATTERNS:
        found = pattern.search(text)
        if found:
            return found.group(0)
    return None


def _normal(text: str) -> str:
    return " ".join(text.replace("|", "/").split()).lower()


def _text_outside_data(text: str, data: Sequence[str]) -> list[str]:
    """The pieces of a text rendering that do not render a data value.

    Renderings put each data value in a cell of its own, between '|' separators, possibly cut
    short with '…'; a cell is data when it is the beginning of one of the result's data strings.
    """
    normal_data = [_normal(d) for d in data]
    outside = []
    for line in text.splitlines():
        for cell in line.split("|"):
            piece = _normal(cell.strip().removesuffix("…"))
            if piece and not any(d.startswith(piece) for d in normal_data):
                outside.append(cell.strip())
    return outside


def non_data_problem(structured: Any, text: str, *, planted: Sequence[str] = ()) -> str | None:
    """Where lakegate's own words in a result (not the data) read as an instruction or hold planted text."""
    data = data_strings(structured) if structured is not None else []
    pieces = [(f"structured {path}", value) for path, value in non_data_strings(structured)]
    pieces += [("text", piece) for piece in _text_outside_data(text, data)]
    for where, value in pieces:
        phrase = instruction_like(value)
        if phrase is not None:
            return f"instruction-like text {phrase!r} outside the data fields ({where}: {_short(value)})"
        for planted_text in planted:
            if planted_text.lower() in value.lower():
                return f"planted text {planted_text!r} outside the data fields ({where}: {_short(value)})"
    return None


def check_planted(structured: Any, text: str, planted: Sequence[str]) -> str | None:
    """Why planted text is not returned as data only: missing from the data fields, or found elsewhere."""
    data = data_strings(structured) if structured is not None else []
    for planted_text in planted:
        if not any(planted_text.lower() in d.lower() for d in data):
            return f"planted text {planted_text!r} is not in any data field of the result"
    return non_data_problem(structured, text, planted=planted)
