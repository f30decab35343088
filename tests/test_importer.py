"""`fulmen.importer.import_from_string`: "module:attr" strings and their errors."""

from __future__ import annotations

import pytest

from fulmen.importer import ImportFromStringError, import_from_string
from tests import apps


def test_imports_module_attribute() -> None:
    assert import_from_string("tests.apps:app") is apps.app


def test_imports_dotted_attribute() -> None:
    assert import_from_string("tests.apps:namespace.inner.app") is apps.app


def test_non_string_is_returned_unchanged() -> None:
    assert import_from_string(apps.app) is apps.app


@pytest.mark.parametrize("text", ["tests.apps", "tests.apps:", ":app", ""])
def test_malformed_string(text) -> None:
    with pytest.raises(ImportFromStringError) as info:
        import_from_string(text)
    assert str(info.value) == f'Import string "{text}" must be in format "<module>:<attribute>".'


@pytest.mark.parametrize("module", ["no_such_module_xyz", "no_such_pkg_xyz.sub", "tests.no_such"])
def test_missing_module(module) -> None:
    with pytest.raises(ImportFromStringError) as info:
        import_from_string(f"{module}:app")
    assert str(info.value) == f'Could not import module "{module}".'
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("attrs", ["missing", "namespace.missing", "namespace.inner.app.x"])
def test_missing_attribute(attrs) -> None:
    with pytest.raises(ImportFromStringError) as info:
        import_from_string(f"tests.apps:{attrs}")
    assert str(info.value) == f'Attribute "{attrs}" not found in module "tests.apps".'


def test_missing_dependency_of_the_module_propagates(tmp_path, monkeypatch) -> None:
    # The module exists but imports something that does not: that is the app's own error.
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        import_from_string("needs_dep:app")
    assert info.value.name == "no_such_dependency_xyz"


def test_error_raised_by_the_module_propagates(tmp_path, monkeypatch) -> None:
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="boom at import"):
        import_from_string("raises_on_import:app")
