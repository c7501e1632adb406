"""The ``none`` editor: records requests and changes nothing (the unedited baseline)."""
from __future__ import annotations

from typing import Sequence

from recipe.editors.base import Editor, register_editor
from recipe.types import EditId, EditRequest


@register_editor
class NoEditor(Editor):
    name = "none"

    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        pass

    def remove(self, ids: Sequence[EditId]) -> None:
        pass

    def rollback(self) -> None:
        self._next_id = 0
