"""The database package's layout: which module may import what, and one driver module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sparc.database
from tests.conftest import REPO_ROOT

SOURCE = REPO_ROOT / "src" / "sparc"
PACKAGE = SOURCE / "database"

# What each module of the package may import from SPARC (package modules by their short name).
ALLOWED_SPARC_IMPORTS: dict[str, set[str]] = {
    "errors": set(),
    "sql": set(),
    "driver": set(),
    "events": set(),
    "turns": set(),
    "deadlines": set(),
    "replay": set(),
    "_asyncpg": {"driver", "errors"},
    "pool": {
        *("_asyncpg", "deadlines", "driver", "errors", "events", "sql", "turns"),
        "sparc.settings",
    },
    "states": set(),
    "unit": {"_asyncpg", "driver", "errors", "pool", "sql", "states"},
    "context": {"client", "unit"},
    "client": {
        *("context", "driver", "events", "pool", "sql", "states", "unit"),
        *("sparc.embedded", "sparc.settings"),
    },
    "middleware": {"client", "context", "errors", "replay", "unit", "sparc.problems"},
}
DRIVERS = {"asyncpg", "databases"}
# Only the modules that deal in HTTP may know the web framework.
HTTP_MODULES = {"replay", "middleware"}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, by its full dotted name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            # `from sparc.database import _asyncpg` imports a module of the package.
            if node.module == "sparc.database":
                names.update(
                    f"sparc.database.{alias.name}"
                    for alias in node.names
                    if (PACKAGE / f"{alias.name}.py").is_file()
                )
    return names


def sparc_imports(path: Path) -> set[str]:
    names = set()
    for name in imported_modules(path):
        if name.startswith("sparc.database."):
            names.add(name.removeprefix("sparc.database."))
        elif name.startswith("sparc") and name != "sparc.database":
            names.add(name)
    return names


def package_modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def test_every_module_of_the_package_has_its_place_in_the_layout() -> None:
    assert package_modules() == sorted(ALLOWED_SPARC_IMPORTS)


@pytest.mark.parametrize("module", sorted(ALLOWED_SPARC_IMPORTS))
def test_module_imports_only_what_the_layout_allows(module: str) -> None:
    path = PACKAGE / f"{module}.py"
    assert sparc_imports(path) <= ALLOWED_SPARC_IMPORTS[module]
    third_party = {name.split(".")[0] for name in imported_modules(path)}
    if module != "_asyncpg":
        assert not third_party & DRIVERS
    if module not in HTTP_MODULES:
        assert "starlette" not in third_party


def test_only_the_driver_module_imports_the_driver() -> None:
    importers = {
        path.relative_to(SOURCE).as_posix()
        for path in SOURCE.rglob("*.py")
        if {name.split(".")[0] for name in imported_modules(path)} & DRIVERS
    }
    assert importers == {"database/_asyncpg.py"}


def test_code_outside_the_package_uses_only_its_public_contract() -> None:
    for path in [*SOURCE.glob("*.py"), *(REPO_ROOT / "alembic").rglob("*.py")]:
        reached = {name for name in imported_modules(path) if name.startswith("sparc.database.")}
        assert not reached, f"{path.name} imports {reached}; use sparc.database"


def test_every_module_opens_with_a_line_saying_what_it_owns() -> None:
    for path in sorted(SOURCE.rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{path.relative_to(SOURCE)} has no docstring"


def test_no_module_is_longer_than_400_lines() -> None:
    lengths = {
        path.relative_to(SOURCE).as_posix(): len(path.read_text().splitlines())
        for path in SOURCE.rglob("*.py")
    }
    assert {name: n for name, n in lengths.items() if n > 400} == {}


def test_the_public_names_are_listed_and_errors_carry_the_public_module() -> None:
    for name in sparc.database.__all__:
        exported = getattr(sparc.database, name)
        if isinstance(exported, type) and issubclass(exported, Exception):
            assert exported.__module__ == "sparc.database", name
    assert "sparc.database.PoolTimeout" in repr(sparc.database.PoolTimeout)
