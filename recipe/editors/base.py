"""The one Editor protocol, its registry, and ParamSnapshot (bit-exact undo for weight edits).

Single, batch and sequential editing are the evaluation loop's choice, not an editor flag: ``edit``
always applies on top of every earlier edit. Each editor owns its undo.

``edit`` is all-or-nothing: the whole batch is checked before anything changes, and if applying it
fails part-way, the editor's :meth:`Editor._savepoint` puts the model and the editor back as they were.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from recipe.config import configs_dir, load_config, to_dict
from recipe.errors import ConfigError, IncompatibleError, RecipeError, UnknownNameError
from recipe.lm import EditedLM
from recipe.types import EditId, EditRequest


@dataclass
class EditorConfig:
    """Base class of every editor's config dataclass (one YAML per editor in configs/editors/).

    ``counts`` names the fields that must be whole numbers >= 1 (steps, batch sizes, sample counts).
    """

    counts: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in self.counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{type(self).__name__} needs {name} >= 1 (a whole number), got {value!r}")


class Editor(abc.ABC):
    """Applies edits to an :class:`EditedLM`, on top of all earlier ones, and can undo them."""

    name: ClassVar[str]
    config_cls: ClassVar[type[EditorConfig]] = EditorConfig

    def __init__(self, lm: EditedLM, config: EditorConfig | None = None):
        self.lm = lm
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise RecipeError(f"{self.name} needs a {self.config_cls.__name__}, got {type(self.config).__name__}")
        self._next_id = 0

    # ---- the protocol ------------------------------------------------------------------------
    @abc.abstractmethod
    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        """Write ``requests`` into the model (the checked, id-assigned body of :meth:`edit`)."""

    def edit(self, requests: Sequence[EditRequest]) -> list[EditId]:
        """Apply ``requests`` on top of every earlier edit; returns one id per request.

        All or nothing: a bad request anywhere in the batch is refused before anything changes, and
        an error while applying restores the model and the editor to what they were before the call.
        """
        requests = self._check(requests)
        ids = list(range(self._next_id, self._next_id + len(requests)))
        restore = self._savepoint()
        try:
            self._apply(requests, ids)
        except BaseException:
            restore()
            raise
        self._next_id += len(requests)
        return ids

    def _savepoint(self) -> Callable[[], None]:
        """A function that undoes whatever :meth:`_apply` changes from now on. The default undoes
        nothing: right for editors whose ``_apply`` changes state only in its last, infallible step."""
        return lambda: None

    def remove(self, ids: Sequence[EditId]) -> None:
        """Undo single edits, where the method can (weight editors cannot: use rollback)."""
        raise RecipeError(f"editor {self.name!r} cannot undo single edits; use rollback() to undo all")

    @abc.abstractmethod
    def rollback(self) -> None:
        """Undo every edit: afterwards ``lm`` computes exactly what the base model computes."""

    def state_dict(self) -> dict:
        """Enough to resume a lifelong run on a freshly loaded base model."""
        return {"editor": self.name, "model": self.lm.spec.name, "config": to_dict(self.config),
                "next_id": self._next_id}

    def load_state_dict(self, state: dict) -> None:
        """Replace every edit by those of ``state``. Every value is checked before anything changes: on
        any error the editor and the model are left exactly as they were."""
        self._next_id = self._check_state(state)

    def _check_state(self, state: dict) -> int:
        """The checks every state passes (a dict from this editor and model, a valid next id); returns the next id."""
        if not isinstance(state, dict):
            raise IncompatibleError(f"an editor state is a dict, got {type(state).__name__}")
        if state.get("editor") != self.name:
            raise IncompatibleError(f"state was saved by editor {state.get('editor')!r}, not {self.name!r}")
        if state.get("model") != self.lm.spec.name:
            raise IncompatibleError(f"state was made for model {state.get('model')!r}, not {self.lm.spec.name!r}")
        next_id = state.get("next_id")
        if not isinstance(next_id, int) or isinstance(next_id, bool) or next_id < 0:
            raise IncompatibleError(f"state's next_id must be a non-negative int, got {next_id!r}")
        return next_id

    # ---- helpers -----------------------------------------------------------------------------
    def _check(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        if isinstance(requests, EditRequest):
            requests = [requests]
        requests = list(requests)
        if not requests:
            raise RecipeError("edit() got no requests")
        for r in requests:
            if not isinstance(r, EditRequest):
                raise RecipeError(f"edit() takes EditRequest objects, got {type(r).__name__}")
            n_tokens = len(self.lm.prompt_ids(r.prompt)) + len(self.lm.target_ids(r.target_new))  # raise on empty
            if n_tokens > self.lm.max_length:
                raise RecipeError(f"prompt + target of {n_tokens} tokens do not fit the model's context of "
                                  f"{self.lm.max_length}: {r.prompt[:60]!r} -> {r.target_new[:60]!r}")
        return requests

    def default_layer(self, configured: int | None) -> int:
        """The configured layer, else the model config's ``edit_layers[name]``; range-checked."""
        layer = configured if configured is not None else self.lm.spec.edit_layers.get(self.name)
        if layer is None:
            raise RecipeError(f"no layer configured for {self.name!r} and model {self.lm.spec.name!r} has no "
                              f"edit_layers.{self.name} in configs/models/")
        n = self.lm.model.config.num_hidden_layers
        if not -n <= layer < n:
            raise RecipeError(f"layer {layer} is out of range for {self.lm.spec.name!r} ({n} layers)")
        return layer % n


class ParamSnapshot:
    """Bit-exact undo for weight edits: clones each parameter the first time it is touched."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._saved: dict[str, torch.Tensor] = {}

    def touch(self, name: str) -> torch.nn.Parameter:
        param = self.model.get_parameter(name)
        self._saved.setdefault(name, param.detach().clone())
        return param

    @property
    def names(self) -> list[str]:
        return list(self._saved)

    def savepoint(self) -> Callable[[], None]:
        """A function that puts every parameter back as it is now (parameters first touched later:
        back to their originals)."""
        now = {n: self.model.get_parameter(n).detach().clone() for n in self._saved}

        @torch.no_grad()
        def restore() -> None:
            for name in list(self._saved):
                value = now[name] if name in now else self._saved.pop(name)
                self.model.get_parameter(name).copy_(value)

        return restore

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self._saved.items():
            self.model.get_parameter(name).copy_(original)
        self._saved.clear()

    def current(self) -> dict[str, torch.Tensor]:
        """The edited values of every touched parameter (CPU copies)."""
        return {n: self.model.get_parameter(n).detach().cpu().clone() for n in self._saved}

    def check(self, values: object, allowed: Sequence[str] | None) -> None:
        """IncompatibleError unless ``values`` maps names of parameters (of ``allowed``, when given) to
        finite tensors of their shapes; nothing changes either way."""
        if not isinstance(values, dict):
            raise IncompatibleError(f"saved parameters must be a dict, got {type(values).__name__}")
        for name, value in values.items():
            if allowed is not None and name not in allowed:
                raise IncompatibleError(f"saved parameter {name!r} is not one this editor edits ({list(allowed)})")
            try:
                param = self.model.get_parameter(name)
            except AttributeError:
                raise IncompatibleError(f"saved parameter {name!r} does not exist in this model") from None
            check_tensor(value, tuple(param.shape), f"saved {name!r}")

    @torch.no_grad()
    def load(self, values: dict[str, torch.Tensor]) -> None:
        """Undo every edit, then write ``values`` (checked with :meth:`check` first) into the model."""
        self.restore()
        for name, value in values.items():
            param = self.touch(name)
            param.copy_(value.to(param.device, param.dtype))

    def original(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as it was before any edit (its saved clone, or the untouched parameter)."""
        return self._saved[name] if name in self._saved else self.model.get_parameter(name).detach()


def check_tensor(value: object, shape: tuple, where: str) -> torch.Tensor:
    """``value`` if it is a finite tensor of ``shape`` (None in ``shape``: any size), else IncompatibleError."""
    if not isinstance(value, torch.Tensor):
        raise IncompatibleError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.dim() != len(shape) or any(w is not None and g != w for g, w in zip(value.shape, shape)):
        raise IncompatibleError(f"{where} has shape {tuple(value.shape)}, expected {shape}")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise IncompatibleError(f"{where} holds NaN or inf")
    return value


class WeightEditor(Editor):
    """An editor that changes parameters in place and undoes through a :class:`ParamSnapshot`."""

    def __init__(self, lm: EditedLM, config: EditorConfig | None = None):
        super().__init__(lm, config)
        self.snapshot = ParamSnapshot(lm.model)

    def rollback(self) -> None:
        self.snapshot.restore()
        self._next_id = 0

    def _savepoint(self) -> Callable[[], None]:
        return self.snapshot.savepoint()

    #: names of the parameters this editor may change (None: any); a state naming others is refused
    editable_params: Sequence[str] | None = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "params": self.snapshot.current()}

    def load_state_dict(self, state: dict) -> None:
        next_id = self._check_state(state)
        params = state.get("params", {})
        self.snapshot.check(params, self.editable_params)
        self.snapshot.load(params)
        self._next_id = next_id


EDITORS: dict[str, type[Editor]] = {}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Class decorator: make ``cls`` loadable by ``cls.name``."""
    if cls.name in EDITORS and EDITORS[cls.name] is not cls:
        raise RecipeError(f"editor name {cls.name!r} registered twice")
    EDITORS[cls.name] = cls
    return cls


def editor_names() -> list[str]:
    return sorted(EDITORS)


def editor_config(name: str, config: str | Path | dict | EditorConfig | None = None, **overrides) -> EditorConfig:
    """The checked config of editor ``name``: a dataclass, a dict, a YAML path, or (None) the default
    ``configs/editors/<name>.yaml``; keyword overrides are checked like file keys."""
    if name not in EDITORS:
        raise UnknownNameError(f"unknown editor {name!r}; available: {editor_names()}")
    if isinstance(config, EditorConfig):
        return config
    if config is None:
        default = configs_dir() / "editors" / f"{name}.yaml"
        config = default if default.exists() else {}
    return load_config(EDITORS[name].config_cls, config, **overrides)


def load_editor(name: str, lm: EditedLM, config: str | Path | dict | EditorConfig | None = None,
                **overrides) -> Editor:
    """Build editor ``name`` on ``lm`` with its config (see :func:`editor_config`)."""
    config = editor_config(name, config, **overrides)
    return EDITORS[name](lm, config)
