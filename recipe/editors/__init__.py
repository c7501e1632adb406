"""Editors behind one protocol. Importing this package registers every built-in editor."""
from recipe.editors.base import EDITORS, Editor, EditorConfig, ParamSnapshot, editor_names, load_editor, register_editor
from recipe.editors import alphaedit, ft, ftm, grace, memit, mend, none, recipe, rome, tpatcher, wise  # noqa: F401  (registration)

__all__ = ["EDITORS", "Editor", "EditorConfig", "ParamSnapshot", "editor_names", "load_editor", "register_editor"]
