"""The column review's parts on their own: what values look like (policies/column_detectors.py) and
the review file of the policy set (policies/column_review.py). The whole review, from a hidden
column to its accepted tags, runs against real catalogs in tests/test_attached_catalogs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lakegate.policies.column_detectors import MIN_VALUES, suggest
from lakegate.policies.column_review import load_column_review


@pytest.mark.parametrize(
    ("column", "values", "kind"),
    [
        ("contact", ["ada@example.com", "bo.b+x@mail.example.org", "c@d.io", "e_f@g.co", "h@i.de"], "email addresses"),
        (
            "tel",
            ["+44 20 7946 0018", "(202) 555-0143", "+49 30 901820", "030-555-0192", "+1 617 555 0100"],
            "phone numbers",
        ),
        (
            "pan",
            ["4111 1111 1111 1111", "5500-0000-0000-0004", "340000000000009", "4012888888881881", "6011000000000004"],
            "payment card numbers",
        ),  # fmt: skip
        ("ip", ["10.0.0.1", "192.168.1.20", "2001:db8::1", "172.16.5.4", "8.8.8.8"], "IP addresses"),
        (
            "customer_name",
            ["Ada Lovelace", "Grace Hopper", "Alan Mathison Turing", "Jean-Luc Picard", "Ken O'Neil"],
            "person names",
        ),  # fmt: skip
    ],
)
def test_each_kind_is_recognised(column: str, values: list[str], kind: str) -> None:
    found = suggest(column, values)
    assert found is not None and found.kind == kind and found.tags == ("pii",) and found.matched == len(values)


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("order_code", ["1234567", "2345678", "3456789", "4567890", "5678901"]),  # bare digits are ids
        ("card", ["4111 1111 1111 1112", "5500-0000-0000-0005", "1234567890123", "4012888888881882", "12"]),  # no Luhn
        (
            "title",
            ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Ken Thompson", "Barbara Liskov"],
        ),  # not a name column
        ("email", ["ada@example.com", "bo@example.com", "n/a", "unknown", "-", "none"]),  # under 80 %
        ("email", ["ada@example.com"] * (MIN_VALUES - 1)),  # too few values
        ("amount", [1, 2, 3, 4, 5, 6]),  # numbers are never personal data here
    ],
)
def test_nothing_is_suggested_without_enough_evidence(column: str, values: list[object]) -> None:
    assert suggest(column, values) is None


def test_the_review_file_names_scopes_and_reviewed_columns(tmp_path: Path) -> None:
    path = tmp_path / "column_review.yaml"
    path.write_text(
        "hide_unreviewed: [lake, local.sales]\n"
        "reviewed:\n"
        "  lake.sales.customers.email: {tags: [pii], by: steward, at: '2026-12-07'}\n"
        "  lake.sales.orders.note: {}\n"
    )
    review = load_column_review(path)
    assert review.in_scope("lake.sales.orders.note") and review.in_scope("local.sales.orders.id")
    assert not review.in_scope("local.finance.payments.id") and not review.in_scope("lakehouse.a.b.c")
    assert review.groups() == [("lake.sales.customers.email", "tag:pii")]
    assert load_column_review(tmp_path / "missing.yaml").scopes == ()
    for bad in ("hide_unreviewed: [Lake]\n", "reviewed: {orders.note: {}}\n", "reviewed: {a.b.c: {tags: [Bad Tag]}}\n"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="column_review.yaml"):
            load_column_review(path)
