"""recipe: lifelong knowledge editing for language models.

    >>> from recipe import EditedLM, EditRequest, load_model, load_editor
    >>> model, tokenizer, spec = load_model("smollm2-135m")
    >>> lm = EditedLM(model, tokenizer, spec)
    >>> editor = load_editor("recipe", lm)
    >>> editor.edit([EditRequest("The mother tongue of Danielle Darrieux is", "English")])

Importing ``recipe`` has no side effects and loads neither torch nor transformers: each public name
is imported from its module on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "EditedLM": "recipe.lm",
    "TargetScore": "recipe.lm",
    "EditRequest": "recipe.types",
    "EditCase": "recipe.types",
    "Probe": "recipe.types",
    "EditId": "recipe.types",
    "ModelSpec": "recipe.models",
    "load_model": "recipe.models",
    "known_models": "recipe.models",
    "Editor": "recipe.editors",
    "EditorConfig": "recipe.editors",
    "load_editor": "recipe.editors",
    "editor_names": "recipe.editors",
    "register_editor": "recipe.editors",
    "DATASETS": "recipe.data",
    "load_dataset": "recipe.data",
    "run_sequential": "recipe.eval.sequential",
    "RecipeError": "recipe.errors",
    "ConfigError": "recipe.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from recipe.data import DATASETS, load_dataset
    from recipe.editors import Editor, EditorConfig, editor_names, load_editor, register_editor
    from recipe.errors import ConfigError, RecipeError
    from recipe.eval.sequential import run_sequential
    from recipe.lm import EditedLM, TargetScore
    from recipe.models import ModelSpec, known_models, load_model
    from recipe.types import EditCase, EditId, EditRequest, Probe


def _version() -> str:
    """The installed distribution's version; from a source tree that is not installed, pyproject's."""
    from importlib import metadata
    from pathlib import Path

    try:
        return metadata.version("recipe")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recipe' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
