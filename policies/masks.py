"""Column masks as SQL: how a masked column reads inside a governed query.

Each mask is a DuckDB macro defined in every query sandbox before its configuration is locked, so
that the rewritten SQL stays readable (`lakegate_mask_hash("email") AS "email"`). The hash mask's
key never enters DuckDB: the macro calls a function the query worker registers from Python
(`keyed_hash`), which holds the key, so no SQL text, plan, error or catalog view of the sandbox
can show it (a macro with the key as a literal showed it in every plan). Agents may not call these
functions themselves (the SQL guard rejects every `lakegate_` function), so a mask cannot be used
as an oracle.

Masks keep NULL as NULL, so that counting non-null values gives the same answer masked or clear.
"""

from __future__ import annotations

import hashlib

from lakegate.policies.columns import MASK_METHODS

__all__ = ["KEYED_HASH_FUNCTION", "MACRO_PREFIX", "keyed_hash", "mask_macro_name", "mask_macros"]

MACRO_PREFIX = "lakegate_"
#: The function (VARCHAR -> VARCHAR) behind the hash mask, registered in each sandbox with its key.
KEYED_HASH_FUNCTION = f"{MACRO_PREFIX}keyed_hash"


def mask_macro_name(method: str) -> str:
    """The macro that applies mask `method` ("hash" -> "lakegate_mask_hash").

    Raises:
        ValueError: not a mask lakegate knows.
    """
    if method not in MASK_METHODS:
        raise ValueError(f"unknown mask {method!r}; known: {', '.join(MASK_METHODS)}")
    return f"{MACRO_PREFIX}mask_{method}"


def keyed_hash(key: str, values: list[str | None]) -> list[str | None]:
    """The hash mask of each value: the first 16 hex digits of SHA-256 over the key and the value.

    Keyed, so that a reader cannot confirm a guess by hashing it; stable, so still joinable.
    """
    keyed = hashlib.sha256(key.encode())
    hashed: list[str | None] = []
    for value in values:
        if value is None:
            hashed.append(None)
            continue
        digest = keyed.copy()
        digest.update(value.encode())
        hashed.append(digest.hexdigest()[:16])
    return hashed


def mask_macros(hash_function: str = KEYED_HASH_FUNCTION, suffix: str = "") -> list[str]:
    """CREATE MACRO statements for every mask, named `mask_macro_name(method) + suffix`; the hash
    mask calls `hash_function` (VARCHAR -> VARCHAR, registered by the sandbox with its key:
    `keyed_hash`)."""
    text = "CAST(x AS VARCHAR)"
    bodies = {
        "hash": f"{hash_function}({text})",
        # Keep the last four characters: enough to confirm a phone or card with a customer.
        "partial": f"CASE WHEN x IS NULL THEN NULL ELSE repeat('*', greatest(length({text}) - 4, 0)) "
        f"|| right({text}, 4) END",
        "redact": "CASE WHEN x IS NULL THEN NULL ELSE '[redacted]' END",
        # NULL of the column's own type, so that the result's schema does not change.
        "null": "CASE WHEN false THEN x END",
    }
    return [f"CREATE MACRO {mask_macro_name(method)}{suffix}(x) AS {bodies[method]}" for method in MASK_METHODS]
