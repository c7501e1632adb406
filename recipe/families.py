"""Architecture families: where a causal LM keeps its layers, MLP outputs and embeddings.

One YAML per family in ``configs/models/families/`` (the one source of these facts), picked by the
model's ``config.model_type``: Llama layout (Llama, SmolLM2, Mistral, Qwen2/2.5/3), Gemma-3, GPT-2,
GPT-J and GPT-NeoX. A model registered in ``configs/models/<name>.yaml`` states its own facts and its
measured edit layers; any other model id or folder of a known family gets the family's module paths
and edit layers from its depth (:func:`default_edit_layers`), so every weight editor runs without
``--set layer``.

GPT-2's MLP output projection is a ``Conv1D`` (weight stored ``(in, out)``). :func:`adapt` puts an
``nn.Linear`` in its place whose weight is the transposed *view* of the same storage: the forward
computes the same product, edits write into the model's own parameter, and every editor sees the
``(out, in)`` weight of a Linear as on the other families; the model's state dict (``save_pretrained``)
keeps GPT-2's layout.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from recipe.config import configs_dir, load_config

log = logging.getLogger(__name__)

WEIGHT_EDITORS = ("ft", "ftm", "grace", "tpatcher", "rome", "memit", "mend")


@dataclass(frozen=True)
class Family:
    """Module paths shared by every model of one architecture (``configs/models/families/<name>.yaml``)."""

    model_types: list[str]  # HF ``config.model_type`` values of this family
    layers: str  # ModuleList of decoder layers
    mlp_out: str  # MLP output projection of layer i
    embed_tokens: str  # token embedding module
    conv1d_mlp_out: bool = False  # the projection is a transposed Conv1D (GPT-2): see adapt()
    mlp_post_norm: str | None = None  # norm of layer i's MLP output before the residual add (Gemma-3); None: none


def families() -> dict[str, Family]:
    """Every family by file name, read from ``configs/models/families/*.yaml``."""
    folder = configs_dir() / "models" / "families"
    return {path.stem: load_config(Family, path) for path in sorted(folder.glob("*.yaml"))}


def family_of(model_type: str) -> Family | None:
    """The family whose ``model_types`` holds ``model_type``, or None."""
    return next((f for f in families().values() if model_type in f.model_types), None)


def unknown_architecture_hint(model_type: str, name: str) -> str:
    """What to write so that the weight editors know an architecture no family describes."""
    known = sorted(t for f in families().values() for t in f.model_types)
    return (f"model {name!r} has architecture {model_type!r}, which no family in configs/models/families/ "
            f"describes (known: {known}); describe it in configs/models/families/<family>.yaml (model_types, "
            f"layers, mlp_out, embed_tokens) or register the model in configs/models/<name>.yaml")


def default_edit_layers(n_layers: int) -> dict[str, int | list[int]]:
    """Edit layers from depth alone, where no measured choice exists (``n_layers`` decoder layers).

    - rome: ``n // 6``, an early-middle MLP (ROME's GPT-J choice 5 of 28; measured on SmolLM2: 5 of 30);
    - memit: five consecutive layers from one below ROME's (MEMIT's GPT-J 3-8; SmolLM2: 4-8), clipped;
    - ft, ftm: ``int(0.7 n)`` (measured: SmolLM2 21 of 30, Gemma-3 12 of 18);
    - grace: ``int(0.8 n)`` (measured: SmolLM2 24 of 30);
    - wise: WISE's depth on LLaMA-2-7B, 27 of 32 (SmolLM2: 25 of 30);
    - tpatcher: the last layer (T-Patcher patches the last FFN);
    - mend: the last three layers (MEND edits the last MLPs; it still needs a trained hypernetwork).
    """
    if n_layers < 1:
        raise ValueError(f"a model needs at least one decoder layer, got {n_layers}")
    last, rome = n_layers - 1, n_layers // 6
    return {"rome": rome, "memit": list(range(max(0, rome - 1), min(last, rome + 3) + 1)),
            "ft": int(0.7 * n_layers), "ftm": int(0.7 * n_layers), "grace": int(0.8 * n_layers),
            "wise": min(last, round(27 * n_layers / 32)),
            "tpatcher": last, "mend": list(range(max(0, n_layers - 3), n_layers))}


def _n_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))


def spec_for(config, name: str, hf_id: str | None = None):
    """The :class:`~recipe.models.ModelSpec` of an unregistered model, from its family and depth.

    An unknown architecture gets the Llama paths and no edit layers, with a warning that says which
    config to write: text generation and RECIPE work, the weight editors then stop with the same advice.
    """
    from recipe.models import ModelSpec

    model_type = getattr(config, "model_type", "?")
    family = family_of(model_type)
    if family is None:
        log.warning("%s", unknown_architecture_hint(model_type, name))
        return ModelSpec(name=name, source="hf", hf_id=hf_id)
    return ModelSpec(name=name, source="hf", hf_id=hf_id, layers=family.layers, mlp_out=family.mlp_out,
                     embed_tokens=family.embed_tokens, mlp_post_norm=family.mlp_post_norm,
                     edit_layers=default_edit_layers(_n_layers(config)))


class Conv1DAsLinear(nn.Linear):
    """A GPT-2 ``Conv1D`` seen as an ``nn.Linear``: ``weight`` (out, in) is the transposed view of the
    Conv1D's (in, out) storage, and the state dict keeps the Conv1D layout, so ``save_pretrained`` writes
    a folder that GPT-2 loads as before."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"].T  # (in, out), contiguous

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"].T  # (out, in)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def adapt(model: nn.Module, spec) -> None:
    """Present every Conv1D MLP output projection of ``model`` as an ``nn.Linear`` on the same storage.

    A no-op for families without ``conv1d_mlp_out`` and for a model already adapted. The Linear's weight
    is ``conv.weight.T`` (a view): the parameter keeps its storage, so the product and the model's other
    parameters are unchanged and an edit of the Linear's weight is an edit of the model's weight.
    """
    family = family_of(getattr(model.config, "model_type", "?"))
    if family is None or not family.conv1d_mlp_out:
        return
    for layer in range(_n_layers(model.config)):
        path = spec.mlp_out.format(layer)
        conv = model.get_submodule(path)
        if isinstance(conv, nn.Linear):
            continue
        linear = Conv1DAsLinear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().T, requires_grad=conv.weight.requires_grad)  # (out, in)
        if conv.bias is not None:
            linear.bias = conv.bias
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
