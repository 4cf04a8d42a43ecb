"""The load test's machinery, small enough for CI: two replicas on PostgreSQL, a kill, a policy change.

The real figures come from `python -m lakegate.evals.load_test` (50 sessions, 60 s; README "Running for a
team"); this runs the same code with a few sessions so that a change that breaks reconnecting,
policy propagation or one-record-per-call fails the suite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import pytest

from lakegate.evals import load_test

URL = os.environ.get("LAKEGATE_TEST_POSTGRES_URL")


def _postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def test_two_replicas_survive_a_kill_and_apply_a_policy_change(tmp_path: Path) -> None:
    url = URL or "postgresql://postgres@127.0.0.1:5432/test"
    if not _postgres_answers(url):
        if URL:
            pytest.fail(f"LAKEGATE_TEST_POSTGRES_URL is set but {url} does not answer")
        pytest.skip("no PostgreSQL at 127.0.0.1:5432 (set LAKEGATE_TEST_POSTGRES_URL)")
    out = tmp_path / "load.json"
    code = load_test.main(["--sessions", "6", "--duration", "14", "--postgres", url, "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["non_policy_errors"] == 0, result["errors_sample"]
    assert result["outcomes"]["ok"] > 0 and result["outcomes"]["policy"] > 0
    assert result["policy_change"]["within_bound"], result["policy_change"]
    assert result["kill"]["sessions_reconnected"] >= 1
    assert result["kill"]["sessions_answered_again"] == result["kill"]["sessions_reconnected"]
    audit = result["audit"]
    assert audit["chain_verifies"] and audit["one_record_per_call"], audit
    assert code == 0
