"""The public API: ``from recipe import ...`` gives what the README uses; ``import recipe`` stays cheap."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import recipe
from tests.conftest import REPO


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)


def test_importing_recipe_loads_neither_torch_nor_transformers():
    done = _python("import recipe, sys; heavy = {'torch', 'transformers', 'faiss', 'yaml'} & set(sys.modules); "
                   "assert not heavy, heavy")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", [n for n in recipe.__all__ if n != "__version__"])
def test_every_public_name_is_its_modules_object(name):
    import importlib

    obj = getattr(recipe, name)
    assert obj is getattr(importlib.import_module(recipe._EXPORTS[name]), name)


def test_readme_names_import_from_the_package(tiny):
    from recipe import EditedLM, EditRequest, editor_names, load_dataset, load_editor

    assert isinstance(tiny, EditedLM)
    assert "recipe" in editor_names() and "rome" in editor_names()
    editor = load_editor("ft", tiny, steps=2)
    assert editor.config.steps == 2
    assert editor.edit([EditRequest("The capital of France is", "Rome")]) == [0]
    assert load_dataset("demo")[0].request == EditRequest("The Eiffel Tower is located in the city of", "Rome",
                                                          subject="Eiffel Tower", target_true="Paris")


def test_version_is_the_distributions_else_pyprojects(monkeypatch):
    import tomllib
    from importlib import metadata

    assert recipe.__version__ == metadata.version("recipe")
    assert "__version__" in recipe.__all__ and "__version__" in dir(recipe)

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a source tree that was never pip-installed
    assert recipe.__version__ == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'EditLM'"):
        recipe.EditLM  # noqa: B018
    with pytest.raises(ImportError):
        from recipe import load_editors  # noqa: F401
