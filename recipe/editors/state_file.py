"""Editor states on disk without pickle: ``state.json`` (the structure) + ``tensors.safetensors``.

``Editor.state_dict()`` returns nested dicts and lists of tensors, strings, numbers, booleans and
None. :func:`save_state` replaces every tensor by ``{"__tensor__": "t<i>"}`` in the JSON and stores
it under that name in the safetensors file; :func:`load_state` reverses it. A save writes a new
directory and renames it into place (the repository's protocol), so a crash mid-write leaves the
previous state loadable. ``meta`` holds what the caller needs to check a state belongs to its run
(dataset, seed, how many cases were applied).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from recipe.errors import RecipeError
from recipe.retrieval.repository_format import find_saved, fsync_file, save_atomically

STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
FORMAT_NAME = "recipe.editor_state"
FORMAT_VERSION = 1
_TENSOR = "__tensor__"


class EditorStateError(RecipeError):
    """A saved editor state is missing, half-written, of another format, or holds unsupported values."""


def _flatten(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().clone()  # a copy: safetensors refuses tensors sharing storage
        return {_TENSOR: name}
    if isinstance(value, dict):
        if any(not isinstance(k, str) for k in value):
            raise EditorStateError(f"{where}: only string keys can be saved, got {sorted(map(repr, value))[:3]}")
        if _TENSOR in value:
            raise EditorStateError(f"{where}: the key {_TENSOR!r} is reserved")
        return {k: _flatten(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise EditorStateError(f"{where}: cannot save a {type(value).__name__} in an editor state")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            try:
                return tensors[value[_TENSOR]]
            except KeyError:
                raise EditorStateError(f"tensor {value[_TENSOR]!r} is missing from {TENSOR_FILE}") from None
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_state(state: dict, directory: str | Path, meta: dict | None = None) -> Path:
    """Write ``state`` (an ``Editor.state_dict()``) and ``meta`` (JSON values) to ``directory``, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    body = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "meta": meta or {},
            "state": _flatten(state, tensors, "state")}
    json.dumps(body["meta"])  # fail before writing anything if meta is not JSON

    def write_into(work: Path) -> None:
        safetensors.torch.save_file(tensors, str(work / TENSOR_FILE))
        (work / STATE_FILE).write_text(json.dumps(body))
        for name in (TENSOR_FILE, STATE_FILE):
            fsync_file(work / name)

    target = Path(directory)
    save_atomically(target, write_into, marker=STATE_FILE)
    return target


def load_state(directory: str | Path) -> tuple[dict, dict]:
    """``(state, meta)`` saved by :func:`save_state`; clear errors for a missing or broken directory."""
    target = Path(directory)
    try:
        source = find_saved(target)
    except RecipeError:
        raise EditorStateError(f"no saved editor state at {target}") from None
    for name in (STATE_FILE, TENSOR_FILE):
        if not (source / name).is_file():
            raise EditorStateError(f"{source} is not a complete editor state: {name} is missing")
    try:
        body = json.loads((source / STATE_FILE).read_text())
        tensors = safetensors.torch.load_file(str(source / TENSOR_FILE))
    except (ValueError, OSError, safetensors.SafetensorError) as e:
        raise EditorStateError(f"{source} holds a corrupt editor state: {e}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise EditorStateError(f"{source / STATE_FILE} is not a {FORMAT_NAME} file")
    if body.get("version") != FORMAT_VERSION:
        raise EditorStateError(f"{source} has editor-state version {body.get('version')}; this code reads "
                               f"{FORMAT_VERSION}")
    return _unflatten(body["state"], tensors), body.get("meta", {})
