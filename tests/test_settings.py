"""Settings: one place, documented, with environment and file overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from lakegate.server.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None]]:
    found = []
    for name, field in model.model_fields.items():
        found.append((prefix + name, field.description))
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _fields(annotation, prefix + name + "__")
    return found


def test_every_setting_is_described_and_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for name, description in _fields(Settings):
        assert description, f"setting {name} has no description"
        assert f"LAKEGATE_{name.upper()}" in readme, f"setting {name} is missing from the README"


def test_defaults_work_with_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LAKEGATE_PRINCIPAL", "LAKEGATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings(tmp_path)
    assert settings.state_dir == (tmp_path / ".lakegate").resolve()
    assert settings.audit_path == settings.state_dir / "audit" / "audit.jsonl"
    assert settings.principal is None


def test_file_then_environment_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lakegate.toml").write_text('principal = "alice"\n[limits]\nmax_rows = 10\n')
    monkeypatch.delenv("LAKEGATE_PRINCIPAL", raising=False)
    assert load_settings(tmp_path).principal == "alice"
    monkeypatch.setenv("LAKEGATE_PRINCIPAL", "sam")
    monkeypatch.setenv("LAKEGATE_LIMITS__MAX_ROWS", "20")
    settings = load_settings(tmp_path)
    assert (settings.principal, settings.limits.max_rows) == ("sam", 20)
    assert load_settings(tmp_path, principal="dana").principal == "dana"


def test_invalid_settings_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "lakegate.toml").write_text('[limits]\nmax_rows = "lots"\n')
    with pytest.raises(ValidationError, match="max_rows"):
        load_settings(tmp_path)
