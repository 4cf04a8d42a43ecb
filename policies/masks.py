"""Column masks as SQL: how a masked column reads inside a governed query.

Each mask is a DuckDB macro defined in every query sandbox before its configuration is locked, so
that the rewritten SQL stays readable (`lakegate_mask_hash("email") AS "email"`) and the hash key
never appears in SQL text or audit records. Agents may not call these macros themselves (the SQL
guard rejects every `lakegate_` function), so a mask cannot be used as an oracle.

Masks keep NULL as NULL, so that counting non-null values gives the same answer masked or clear.
"""

from __future__ import annotations

from policies.columns import MASK_METHODS

__all__ = ["MACRO_PREFIX", "mask_macro_name", "mask_macros"]

MACRO_PREFIX = "lakegate_"


def mask_macro_name(method: str) -> str:
    """The macro that applies mask `method` ("hash" -> "lakegate_mask_hash").

    Raises:
        ValueError: not a mask lakegate knows.
    """
    if method not in MASK_METHODS:
        raise ValueError(f"unknown mask {method!r}; known: {', '.join(MASK_METHODS)}")
    return f"{MACRO_PREFIX}mask_{method}"


def mask_macros(hash_key: str) -> list[str]:
    """CREATE MACRO statements for every mask; `hash_key` keys the hash (hex, from the state directory)."""
    if not hash_key.isalnum():
        raise ValueError("the mask hash key must be alphanumeric")
    text = "CAST(x AS VARCHAR)"
    bodies = {
        # Keyed, so that a reader cannot confirm a guess by hashing it; stable, so still joinable.
        "hash": f"left(sha256('{hash_key}' || {text}), 16)",
        # Keep the last four characters: enough to confirm a phone or card with a customer.
        "partial": f"CASE WHEN x IS NULL THEN NULL ELSE repeat('*', greatest(length({text}) - 4, 0)) "
        f"|| right({text}, 4) END",
        "redact": "CASE WHEN x IS NULL THEN NULL ELSE '[redacted]' END",
        # NULL of the column's own type, so that the result's schema does not change.
        "null": "CASE WHEN false THEN x END",
    }
    return [f"CREATE MACRO {mask_macro_name(method)}(x) AS {bodies[method]}" for method in MASK_METHODS]
