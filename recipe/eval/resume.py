"""What a resumed sequential run may reuse from its output folder, and the checks that it is the same run.

A run's identity (editor, editor config, model and its weights, the dataset's cases, seed, scoring
settings) is written to ``identity.json`` when a run starts; ``--resume`` refuses a folder whose identity
differs, so rows, checkpoints and kept states of two runs are never mixed. Inside a folder of the same
run, complete rounds are kept (:func:`completed_rounds`) and a round cut short continues from its
furthest checkpoint (:func:`resume_round`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from recipe.config import to_dict
from recipe.editors.base import Editor
from recipe.editors.state_file import EditorStateError, load_state
from recipe.errors import RecipeError
from recipe.lm import EditedLM
from recipe.types import EditCase

log = logging.getLogger(__name__)
IDENTITY_FILE = "identity.json"
_RUN_FILES = ("T*.jsonl", "T*.round", "state-T*", "unedited.json")  # what a resumed run would reuse


def model_fingerprint(lm: EditedLM) -> str:
    """A cheap content hash of the weights (each parameter's name, shape and first 64 values)."""
    h = hashlib.sha256()
    for name, param in lm.model.named_parameters():
        h.update(f"{name}{tuple(param.shape)}".encode())
        h.update(param.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cases_fingerprint(cases: Sequence[EditCase]) -> str:
    """A hash of every case's content (ids, requests, probes), in the dataset's order."""
    text = json.dumps([dataclasses.asdict(c) for c in cases], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_identity(lm: EditedLM, editor: Editor, cases: Sequence[EditCase], *, seed: int, free_generation: bool,
                 score_cases: int | None, extra: dict[str, Any] | None = None) -> dict:
    """Everything that makes two runs' rows comparable; ``extra`` adds the caller's names (the dataset's)."""
    identity = {"editor": editor.name, "editor_config": to_dict(editor.config), "model": lm.spec.name,
                "model_fingerprint": model_fingerprint(lm), "cases": cases_fingerprint(cases), "seed": seed,
                "free_generation": free_generation, "score_cases": score_cases, **(extra or {})}
    return json.loads(json.dumps(identity, default=str))  # as it reads back from identity.json


def _differences(there: dict, here: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(there) | set(here)):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out


def _recorded_identity(path: Path, resume: bool) -> dict | None:
    """The identity recorded at ``path``; None when there is none (or, starting over, an unreadable one)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        if not resume:
            return None
        raise RecipeError(f"{path} is not valid JSON ({err}); use another output folder or drop --resume") from None


def check_identity(out: Path, identity: dict, resume: bool) -> None:
    """Refuse to resume ``out`` when it holds another run; then record ``identity`` there.

    Without ``resume``, the run starts over in ``out``: checkpoints, kept states and the unedited
    record of another run found there are removed, so that no later ``resume`` can pick them up."""
    path = out / IDENTITY_FILE
    there = _recorded_identity(path, resume)
    diff = _differences(there, identity) if there is not None else []
    leftovers = [p for pattern in _RUN_FILES for p in out.glob(pattern)]
    if resume and diff:
        raise RecipeError(f"{out} holds another run ({'; '.join(diff)}); use another output folder or "
                          "drop --resume to start over there")
    if resume and there is None and leftovers:
        raise RecipeError(f"{out} holds results without {IDENTITY_FILE}, so it cannot be checked to be this "
                          "run; use another output folder or drop --resume")
    if not resume and (there is None or diff):
        for p in leftovers:
            log.info("starting over in %s: removing %s of another run", out, p.name)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(identity, indent=1))
    tmp.replace(path)


def completed_rounds(path: Path, pool: Sequence[EditCase], T: int,
                     scored: dict[tuple[int, int], list[int]]) -> tuple[list[dict], int]:
    """Rows of the complete rounds already in ``path`` and the pool index where the next round starts.

    Each round of T edits wrote the rows of its scored cases (``scored[(T, start)]``) at once; they are
    checked against ``pool``, and a partly written last round is dropped and redone."""
    if not path.exists():
        return [], 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept: list[dict] = []
    start = 0
    while (T, start) in scored:
        idx = scored[(T, start)]
        block = rows[len(kept):len(kept) + len(idx)]
        if len(block) < len(idx):
            break
        for i, r in zip(idx, block):
            if r.get("case_id") != pool[i].case_id:
                raise RecipeError(f"{path} was written by another run (case {i} is {r.get('case_id')!r}, expected "
                                  f"{pool[i].case_id!r}); use another output folder or drop --resume")
        kept += block
        start += T
    return kept, start


def round_meta(T: int, start: int, seed: int, chosen: Sequence[EditCase], edit_times: list[float]) -> dict:
    """What a round's checkpoint records: which edits of which round it holds, and their times."""
    return {"T": T, "start": start, "seed": seed, "applied": len(edit_times),
            "case_ids": [c.case_id for c in chosen[:len(edit_times)]], "edit_times": edit_times}


def resume_round(editor: Editor, paths: Sequence[Path], T: int, start: int, seed: int,
                 chosen: Sequence[EditCase]) -> list[float]:
    """Edit times of the cases already applied by the furthest valid checkpoint among ``paths`` (a
    mid-round checkpoint, or the state a finished round kept); that state is loaded into ``editor``."""
    best: tuple[int, dict, dict, Path] | None = None
    for path in paths:
        if not path.exists():
            continue
        try:
            state, meta = load_state(path)
        except EditorStateError as e:
            log.warning("ignoring the checkpoint %s: %s", path, e)
            continue
        applied = int(meta.get("applied", 0))
        if (meta.get("T"), meta.get("start"), meta.get("seed")) != (T, start, seed) or applied > len(chosen) or \
                meta.get("case_ids") != [c.case_id for c in chosen[:applied]]:
            log.warning("ignoring the checkpoint %s: it belongs to another round or run", path)
            continue
        if best is None or applied > best[0]:
            best = (applied, state, meta, path)
    if best is None:
        return []
    applied, state, meta, path = best
    editor.load_state_dict(state)
    log.info("resuming round %d of T=%d after %d applied edits (%s)", start // T, T, applied, path)
    return [float(t) for t in meta["edit_times"]]
