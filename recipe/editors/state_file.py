"""Editor states on disk without pickle: ``state.json`` (the structure) + ``tensors.safetensors``.

``Editor.state_dict()`` returns nested dicts and lists of tensors, strings, numbers, booleans and
None. :func:`save_state` replaces every tensor by ``{"__tensor__": "t<i>"}`` in the JSON and stores
it under that name in the safetensors file; :func:`load_state` reverses it. Both go through
``recipe.storage``: a save is atomic and locked (a crash mid-write leaves the previous state
loadable), and a load verifies the sha256 of both files, then refuses tensors holding NaN or inf,
before returning anything. ``meta`` holds what the caller needs to check a state belongs to its
run (dataset, seed, how many cases were applied). Whether the values fit an editor is the
editor's ``load_state_dict``'s check.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from recipe.storage import Errors, FolderCorruptError, open_folder, read_json, save_folder, write_json

STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
FORMAT_NAME = "recipe.editor_state"
FORMAT_VERSION = 2  # 2: files covered by manifest.json
_TENSOR = "__tensor__"


class EditorStateError(FolderCorruptError, FileNotFoundError):
    """A saved editor state is missing, damaged, of another format, or holds unsupported values."""


_ERRORS = Errors(not_found=EditorStateError, corrupt=EditorStateError, what="saved editor state")


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


def _unflatten(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            try:
                tensor = tensors[value[_TENSOR]]
            except (KeyError, TypeError):
                raise EditorStateError(f"{where}: tensor {value[_TENSOR]!r} is missing from {TENSOR_FILE}") from None
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise EditorStateError(f"{where}: the saved tensor holds NaN or inf")
            return tensor
        return {k: _unflatten(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def save_state(state: dict, directory: str | Path, meta: dict | None = None) -> Path:
    """Write ``state`` (an ``Editor.state_dict()``) and ``meta`` (JSON values) to ``directory``, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    body = {"meta": meta or {}, "state": _flatten(state, tensors, "state")}
    try:  # fail before writing anything if meta is not JSON
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EditorStateError(f"cannot save this state or meta as JSON: {exc}") from None

    def write_into(work: Path) -> None:
        safetensors.torch.save_file(tensors, str(work / TENSOR_FILE))
        write_json(work / STATE_FILE, body)

    return save_folder(directory, write_into, format_name=FORMAT_NAME, format_version=FORMAT_VERSION)


def load_state(directory: str | Path) -> tuple[dict, dict]:
    """``(state, meta)`` saved by :func:`save_state`, verified; EditorStateError naming what is wrong."""
    with open_folder(directory, format_name=FORMAT_NAME, versions=(FORMAT_VERSION,), errors=_ERRORS) as folder:
        body = read_json(folder, STATE_FILE)
        try:
            tensors = safetensors.torch.load_file(str(folder.file(TENSOR_FILE)))
        except (ValueError, OSError, safetensors.SafetensorError) as e:
            raise EditorStateError(f"{folder.path / TENSOR_FILE} is not a readable tensor file: {e}") from None
    if not isinstance(body.get("meta"), dict) or "state" not in body:
        raise EditorStateError(f"{folder.path / STATE_FILE} lacks 'meta' or 'state'")
    return _unflatten(body["state"], tensors, "state"), body["meta"]
