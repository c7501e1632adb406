"""Saving and loading a RECIPE editor's edits: the repository folder (``save``/``load``) and the state
dict of a lifelong run (``state_dict``/``load_state_dict``).

Both check everything first (the LM and networks the edits were made for, every saved edit's fields,
the repository's own checks), then replace the edits in one step (``_install``) that cannot fail, so a
failed load leaves the editor as it was. Superseded entries are saved with the others (keys and prompts
in the same files) and shelved again at load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recipe.artifacts import check_lm
from recipe.errors import IncompatibleError, RecipeError
from recipe.retrieval.repository import KnowledgeRepository, RepositoryError
from recipe.retrieval.statements import EditRecord, check_entries

ENTRIES_VERSION = 2  # saved edit lists (repository info and state): 2 adds questions and superseded_by


class SavedEdits:
    """The persistence half of :class:`recipe.editors.recipe.RecipeEditor` (mixed in before ``Editor``)."""

    def _check_info(self, info: object, where: str) -> None:
        if not isinstance(info, dict):
            raise IncompatibleError(f"{where} has no info describing its LM and networks (got {info!r:.80})")
        check_lm({"name": info.get("lm"), "hidden_size": info.get("hidden_size")}, self.lm, where)
        for key, want in self.info.items():
            if info.get(key) != want:
                raise IncompatibleError(f"{where} was made with {key}={info.get(key)!r}; this editor has {want!r}")

    def _entries(self) -> dict:
        """Every edit's saved fields, in use first (repository order), then superseded ones."""
        records = [self._records[i] for i in self.repository.ids() + self._shelf.ids()]
        return {"entries_version": ENTRIES_VERSION, "next_id": self._next_id, "ids": [r.id for r in records],
                "statements": [r.statement for r in records], "subjects": [r.subject for r in records],
                "questions": [r.question for r in records], "superseded_by": [r.superseded_by for r in records]}

    def _checked_entries(self, entries: dict, where: str) -> list[EditRecord]:
        """The records of saved edits, every value checked (``check_entries``, then statements)."""
        ids, statements, fields = check_entries(entries, ENTRIES_VERSION, where)
        return self._records_of(ids, statements, where=f"{where}: ", **fields)  # empty, non-text or long: refused

    def _install(self, repository: KnowledgeRepository, records: list[EditRecord], next_id: int) -> None:
        """Replace every edit by ``records`` held in ``repository`` (both already checked); superseded
        ones go back on the shelf."""
        self.rollback()
        shelved = [r.id for r in records if r.superseded_by is not None]
        for i, key, prompt in zip(shelved, repository.keys(shelved), repository.get_prompts(shelved)):
            self._shelf.put(i, key, prompt)
        repository.remove(shelved)
        self.repository = repository
        for record in records:
            self._remember(record)
        self._next_id = next_id
        self.lm.prefix_provider = self._provide

    def _shelved(self) -> tuple[list, np.ndarray, torch.Tensor] | None:
        """The superseded entries' (ids, keys, prompts), saved after the entries in use; None: none."""
        return (self._shelf.ids(), *self._shelf.stacked()) if self._shelf else None

    def snapshot_writer(self) -> Callable[[str | Path], Path]:
        """``writer(directory)`` saving the edits as they are now (what :meth:`save` would write), from any
        thread while this editor goes on editing: the repository's copy-on-write snapshot, the records
        copied. A fraction of a second at 100,000 edits; the writing is left to the caller's thread."""
        return self.repository.snapshot(info={**self.info, "entries": self._entries()}, extra=self._shelved())

    def state_dict(self) -> dict:
        ids, shelved = self.repository.ids(), self._shelved()
        keys, prompts = self.repository.keys(), self.repository.get_prompts(ids)
        if shelved is not None:
            keys, prompts = np.concatenate([keys, shelved[1]]), torch.cat([prompts, shelved[2].float()])
        return {**super().state_dict(), "info": dict(self.info), **self._entries(),
                "keys": torch.from_numpy(keys), "prompts": prompts}

    def load_state_dict(self, state: dict) -> None:
        next_id = self._check_state(state)
        where = "saved RECIPE state"
        self._check_info(state.get("info"), f"the {where}")
        records = self._checked_entries({**state, "next_id": next_id}, where)
        repository = self._new_repository()
        try:
            repository.add(state.get("keys"), state.get("prompts"), ids=[r.id for r in records])
        except RepositoryError as exc:
            raise RecipeError(f"{where}: {exc}") from exc
        self._install(repository, records, next_id)

    def save(self, directory: str | Path) -> Path:
        """Write the repository (keys, prompts, statements, superseded entries, next id) atomically to
        ``directory``."""
        return self.repository.save(directory, info={**self.info, "entries": self._entries()}, extra=self._shelved())

    def load(self, directory: str | Path) -> None:
        """Replace every edit with those saved by :meth:`save` (made for this LM and these networks).

        The folder is verified (checksums, then every value) before anything changes: on any error
        the editor keeps its edits and its next id."""
        saved = KnowledgeRepository.load(directory, use_gpu=self.config.use_gpu, index=self.config.index)
        info = dict(saved.info)
        entries = info.pop("entries", None)
        self._check_info(info, f"RECIPE repository {directory}")
        if not isinstance(entries, dict) or entries.get("ids") != saved.ids():
            raise RecipeError(f"{directory} is a knowledge repository but not one saved by RecipeEditor.save")
        records = self._checked_entries(entries, "saved RECIPE state")
        if saved.prompt_dtype == self.config.prompt_dtype:  # adopt it: no second copy, a saved IVF kept as is
            saved.info = dict(self.info)
            repository = saved
        else:
            repository = self._new_repository()
            repository.add(saved.keys(), saved.get_prompts(saved.ids()), ids=saved.ids())
        self._install(repository, records, entries["next_id"])
