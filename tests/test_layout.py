"""The package's layout and its import arrows, held by reading every module's imports.

README.md's "Layout" section says what lives in each folder and what it may import; this test is
what keeps it true. It reads the imports of every module (ast, every folder, recursively), names
each module as installed (`lakegate.server.gate.scope` for server/gate/scope.py), and fails on an
arrow the rules forbid. A rule is (importer, imported, when): modules under `importer` may not
import modules under `imported`, at all ("never") or outside a function body and outside
`if TYPE_CHECKING:` ("at_import").
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Folder in the repository -> the package it is installed as.
FOLDERS = {
    "base": "lakegate",
    "server": "lakegate.server",
    "tools": "lakegate.tools",
    "policies": "lakegate.policies",
    "catalog": "lakegate.catalog",
    "evals": "lakegate.evals",
}
STORAGE = ("pyiceberg", "lancedb", "duckdb")

When = Literal["never", "at_import"]


@dataclass(frozen=True)
class Rule:
    importer: str
    imported: str
    when: When
    why: str
    exempt: tuple[str, ...] = ()


RULES = (
    Rule("lakegate.errors", "lakegate", "never", "the exception tree is the ground floor: it imports nothing"),
    *(
        Rule(f"lakegate.{low}", f"lakegate.{high}", "never", f"{low}/ stands below {high}/")
        for low, high in (
            ("policies", "catalog"),
            ("policies", "tools"),
            ("policies", "server"),
            ("policies", "evals"),
            ("catalog", "tools"),
            ("catalog", "server"),
            ("catalog", "evals"),
            ("tools", "server"),
            ("tools", "evals"),
        )
    ),
    Rule(
        "lakegate.server",
        "lakegate.evals",
        "at_import",
        "the server runs evals only when asked, in the eval command",
        exempt=("lakegate.server.cli.eval_commands",),
    ),
    *(
        Rule(f"lakegate.{folder}", library, "never", "storage libraries are called from catalog/ only")
        for folder in ("server", "tools", "policies")
        for library in STORAGE
    ),
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    imported: str
    at_import: bool  # at module level, outside `if TYPE_CHECKING:`
    line: int


def module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    parts = list(relative.parts)
    package = FOLDERS[parts[0]]
    rest = [part for part in parts[1:] if part != "__init__"]
    return ".".join([package, *rest])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, root: Path) -> Iterator[Import]:
    """Every import in one module, with whether it runs when the module is imported."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, at_import: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, at_import, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in child.names:
                    yield Import(module, f"{base}.{alias.name}" if base else alias.name, at_import, child.lineno)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or (
                isinstance(child, ast.If) and _is_type_checking(child)
            ):
                yield from visit(child, False)  # runs later, or never
            else:
                yield from visit(child, at_import)

    yield from visit(ast.parse(path.read_text(encoding="utf-8")), True)


def modules(root: Path) -> list[Path]:
    found = [path for folder in FOLDERS for path in (root / folder).rglob("*.py") if "__pycache__" not in path.parts]
    return sorted(found)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path, rules: tuple[Rule, ...] = RULES) -> list[str]:
    """Each forbidden arrow as "module:line imports name (why)"."""
    found = []
    for path in modules(root):
        for imported in imports_of(path, root):
            for rule in rules:
                if not _under(imported.module, rule.importer) or not _under(imported.imported, rule.imported):
                    continue
                if any(_under(imported.module, exempt) for exempt in rule.exempt):
                    continue
                if rule.when == "at_import" and not imported.at_import:
                    continue
                found.append(f"{imported.module}:{imported.line} imports {imported.imported} ({rule.why})")
    return found


def test_the_import_arrows_hold() -> None:
    files = modules(REPO)
    assert len(files) > 80, f"found only {len(files)} modules: the checker is not looking where the code is"
    assert {module_name(path, REPO).split(".")[1] for path in files if "." in module_name(path, REPO)} >= {
        "server",
        "tools",
        "policies",
        "catalog",
        "evals",
    }
    assert not violations(REPO), "\n".join(violations(REPO))


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_checker_catches_a_forbidden_arrow(tmp_path: Path) -> None:
    """Positive control on a small tree: catalog importing the server is caught, however spelt."""
    _write(
        tmp_path,
        {
            "base/__init__.py": "",
            "base/errors.py": "class LakegateError(Exception): ...\n",
            "server/__init__.py": "",
            "server/gate/__init__.py": "",
            "server/gate/scope.py": "from lakegate.catalog.warehouse import Warehouse\n",
            "catalog/__init__.py": "",
            "catalog/warehouse.py": "from lakegate.errors import LakegateError\n",
            "catalog/deep/__init__.py": "",
            "catalog/deep/engine.py": "from lakegate.server.gate import scope\n",
            "catalog/relative.py": "from ..server.settings import Settings\n",
            "catalog/lazy.py": "def f() -> None:\n    import lakegate.server.app\n",
            "server/cli/__init__.py": "",
            "server/cli/run.py": "from lakegate.evals.agent_eval import run\n",
            "server/late.py": "def f() -> None:\n    from lakegate.evals import x\n",
            "server/store.py": "import duckdb\n",
            "tools/__init__.py": "",
            "tools/query.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from lakegate.server.gate.scope import S\n",
            "policies/__init__.py": "",
            "evals/__init__.py": "",
        },
    )
    found = violations(tmp_path)
    assert any(v.startswith("lakegate.catalog.deep.engine:1 imports lakegate.server.gate.scope") for v in found)
    assert any(v.startswith("lakegate.catalog.relative:1 imports lakegate.server.settings.Settings") for v in found)
    assert any(v.startswith("lakegate.catalog.lazy:2 imports lakegate.server.app") for v in found)  # "never"
    assert any(v.startswith("lakegate.server.cli.run:1 imports lakegate.evals") for v in found)  # at import
    assert any(v.startswith("lakegate.server.store:1 imports duckdb") for v in found)
    assert any(v.startswith("lakegate.tools.query:3 imports lakegate.server") for v in found)  # types too
    assert not any(
        v.startswith(("lakegate.server.late", "lakegate.catalog.warehouse", "lakegate.server.gate")) for v in found
    )
    assert len(found) == 6, found


def test_every_package_folder_is_installed() -> None:
    """pyproject lists the packages one by one (they are mapped from folders): none may be missing."""
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(path, REPO) for path in modules(REPO) if path.name == "__init__.py"}
    assert folders == declared


@pytest.mark.parametrize(
    "path", [*modules(REPO), *sorted((REPO / "tests").glob("*.py"))], ids=lambda path: str(path.relative_to(REPO))
)
def test_no_module_is_over_800_lines(path: Path) -> None:
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 800


def test_server_keeps_fewer_than_10_flat_modules() -> None:
    assert len(list((REPO / "server").glob("*.py"))) < 10


@pytest.mark.parametrize(
    "package",
    [
        "lakegate.server.gate",
        "lakegate.server.audit",
        "lakegate.server.transports",
        "lakegate.server.cli",
        "lakegate.tools",
    ],
)
def test_each_sub_package_has_a_small_public_face(package: str) -> None:
    """What other packages use of a sub-package, it exports (`__all__`), and every name resolves."""
    import importlib

    module = importlib.import_module(package)
    exported = getattr(module, "__all__", [])
    assert 0 < len(exported) <= 12 and all(hasattr(module, name) for name in exported), exported
