"""What a column's values look like: the tag suggestions of `lakegate catalog review`.

A reviewer looks at columns nobody has tagged yet; lakegate reads a small sample of each (through
the gate) and says which look like personal data, so that the reviewer's decision starts from
evidence. A suggestion is only that: nothing is tagged until the reviewer accepts it.

How each kind is recognised, value by value (text values only; numbers are never personal data
here, an id is not a phone number):
- email address: one @, something before it, a dotted domain after it ending in 2+ letters;
- phone number: 7 to 15 digits once spaces, dots, dashes and parentheses are removed, written with
  a leading + or with such separators (a bare run of digits is an id, not a phone);
- payment card number: 13 to 19 digits (spaces and dashes allowed) that pass the Luhn check;
- IP address: an IPv4 or IPv6 address, as Python's ipaddress module parses it;
- person name: two to four capitalised words of letters (hyphens and apostrophes inside), in a
  column whose name says it holds a name (`name`, `full_name`, `customer_name`, ...): product
  names look the same, so the column name has to agree.

A column is suggested a kind when at least `SHARE` of its sampled non-empty values are of that
kind (and at least `MIN_VALUES` were sampled). Every kind suggests the tag `pii`, with the kind
named in the evidence.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["MIN_VALUES", "SHARE", "Suggestion", "suggest"]

#: The share of sampled values that must be of a kind for the column to be suggested it.
SHARE = 0.8
#: Fewer sampled values than this suggest nothing (too little evidence).
MIN_VALUES = 5

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")
_PHONE_SEPARATORS = re.compile(r"[\s.\-()]")
_DIGITS = re.compile(r"^\d+$")
_NAME_WORD = re.compile(r"^[A-Z][a-z]*(?:['\-][A-Za-z][a-z]+)*$")
_NAME_COLUMN = re.compile(r"(^|_)(full_|first_|last_|given_|family_|middle_|customer_|contact_|person_)?name$")


@dataclass(frozen=True)
class Suggestion:
    """Tags suggested for a column, and why."""

    tags: tuple[str, ...]
    kind: str  # what the values look like, e.g. "email addresses"
    matched: int
    sampled: int

    @property
    def evidence(self) -> str:
        return f"{self.kind}: {self.matched} of {self.sampled} sampled values"


def _email(value: str) -> bool:
    return bool(_EMAIL.match(value))


def _phone(value: str) -> bool:
    digits = _PHONE_SEPARATORS.sub("", value.removeprefix("+"))
    written = value.startswith("+") or digits != value
    return written and bool(_DIGITS.match(digits)) and 7 <= len(digits) <= 15


def _card(value: str) -> bool:
    digits = value.replace(" ", "").replace("-", "")
    if not _DIGITS.match(digits) or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = int(char)
        if index % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _person(value: str) -> bool:
    words = value.split()
    return 2 <= len(words) <= 4 and all(len(word) > 1 and _NAME_WORD.match(word) for word in words)


_KINDS: tuple[tuple[str, Callable[[str], bool], bool], ...] = (
    # (kind, test of one value, whether the column's name must say it holds names)
    ("email addresses", _email, False),
    ("payment card numbers", _card, False),
    ("IP addresses", _ip, False),
    ("phone numbers", _phone, False),
    ("person names", _person, True),
)


def suggest(column: str, values: Sequence[object]) -> Suggestion | None:
    """The suggestion for `column` (its name) from a sample of its values, or None."""
    texts = [value.strip() for value in values if isinstance(value, str) and value.strip()]
    if len(texts) < MIN_VALUES:
        return None
    for kind, test, by_name in _KINDS:
        if by_name and not _NAME_COLUMN.search(column.lower()):
            continue
        matched = sum(1 for text in texts if test(text))
        if matched >= SHARE * len(texts):
            return Suggestion(("pii",), kind, matched, len(texts))
    return None
