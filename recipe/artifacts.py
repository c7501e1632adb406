"""The three trained artefacts (RECIPE networks, MEND hypernetwork, edit verifier): save, verify, load.

An artefact is a folder written by ``recipe.storage`` (so every file, JSON included, is covered by
the sha256 in ``manifest.json``) holding one JSON file of metadata and one safetensors file of
weights. The metadata records the LM the artefact was made for (``lm``: name, hidden size,
vocabulary size and :func:`lm_fingerprint`, the verifier excepted: it reads text only) and what
is needed to rebuild the networks. Loading verifies the folder, then the LM, then that the weights
hold exactly the tensors the rebuilt networks have, with their shapes and finite values, before any
network sees a value.

Shipped artefacts (``checkpoints/<name>`` in the source tree) are found by :func:`resolve_checkpoint`:
a relative path that names one resolves to the source tree's ``checkpoints/``, whatever the current
directory holds; every other path is the user's own (relative to the current directory). A config's
``checkpoint: shipped`` names the shipped artefact made for the LM at hand (:func:`shipped_checkpoint`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import Tensor, nn

from recipe.config import from_dict, repo_root
from recipe.errors import IncompatibleError, RecipeError
from recipe.retrieval.encoders import RecipeArchitecture
from recipe.retrieval.networks import RecipeNetworks
from recipe.retrieval.statements import DEFAULT_SEPARATOR
from recipe.retrieval.verifier import EditVerifier, VerifierArchitecture
from recipe.storage import Errors, FolderCorruptError, FolderNotFoundError, VerifiedFolder, open_folder, read_json
from recipe.storage import save_folder, write_json

if TYPE_CHECKING:
    from recipe.editors.mend import MENDNetworks
    from recipe.editors.recipe import PrefixMode
    from recipe.lm import EditedLM

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: files covered by manifest.json, the LM's vocabulary size and fingerprint recorded
SHIPPED_DIR = "checkpoints"
SHIPPED = "shipped"  # a config's checkpoint value: the shipped artefact made for the LM (shipped_checkpoint)


class ArtifactError(IncompatibleError, FolderCorruptError):
    """A trained artefact is missing, damaged, or does not fit the networks or the LM it is loaded for."""


class ArtifactNotFoundError(ArtifactError, FolderNotFoundError):
    """No artefact at the given path."""


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artefact: its format name and the names of its two files."""

    format_name: str
    meta_file: str
    weights_file: str
    what: str  # in messages
    trainer: str  # the `recipe train` command that makes one

    @property
    def errors(self) -> Errors:
        return Errors(not_found=ArtifactNotFoundError, corrupt=ArtifactError, what=self.what)


RECIPE = ArtifactKind("recipe.artifact", "recipe.json", "weights.safetensors", "RECIPE checkpoint", "recipe")
MEND = ArtifactKind("mend.artifact", "mend.json", "weights.safetensors", "MEND checkpoint", "mend")
VERIFIER = ArtifactKind("recipe-verifier", "verifier.json", "verifier.safetensors", "verifier artefact", "verifier")


# ---- generic ------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """Where the artefact ``path`` (from a config or the command line) is.

    ``~`` is expanded; an absolute path is used as is. A relative path that names a shipped artefact
    (``checkpoints/recipe-smollm2``: it exists under the source tree's ``checkpoints/``) resolves
    there, never to a folder of the same name in the current directory; any other relative path is
    relative to the current directory. To load a folder that shares a shipped artefact's relative
    name, give its absolute path.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    root = repo_root()
    shipped = (root / path).resolve()
    if shipped.is_relative_to((root / SHIPPED_DIR).resolve()) and shipped.is_dir():
        return shipped
    return path.resolve()


def shipped_checkpoint(kind: ArtifactKind, lm: EditedLM) -> str:
    """``checkpoints/<name>``: the shipped artefact of ``kind`` made for ``lm``.

    Chosen by what :func:`check_lm` compares (hidden size, vocabulary, fingerprint), so a local copy of
    a bundled model finds its checkpoint too; one recorded for ``lm``'s own name wins a tie. The choice
    reads only each artefact's metadata; loading the chosen one verifies it in full.
    """
    root = repo_root() / SHIPPED_DIR
    fits = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            saved = json.loads((folder / kind.meta_file).read_text())["lm"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another kind of artefact (or none)
        if lm_mismatch(saved, lm) is None:
            fits.append((saved.get("name") != lm.spec.name, folder.name))
    if not fits:
        raise IncompatibleError(f"no shipped {kind.what} was made for LM {lm.spec.name!r} (hidden size {lm.hidden_size}); "
                                f"train one with `recipe train {kind.trainer} --model {lm.spec.name}` "
                                f"and pass its folder as --set checkpoint=FOLDER")
    return f"{SHIPPED_DIR}/{min(fits)[1]}"


def lm_meta(lm: EditedLM) -> dict[str, Any]:
    """What an artefact records about the LM it was made for."""
    return {"name": lm.spec.name, "hidden_size": lm.hidden_size, "vocab_size": len(lm.tokenizer),
            "fingerprint": lm_fingerprint(lm)}


def lm_fingerprint(lm: EditedLM) -> str:
    """sha256 over the LM's architecture sizes and its tokenizer's vocabulary (not its weights: the same
    model loaded in another dtype or on another device keeps its fingerprint)."""
    config = lm.model.config
    sizes = {k: getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    digest = hashlib.sha256(json.dumps(sizes, sort_keys=True).encode())
    digest.update(json.dumps(sorted(lm.tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


def check_lm(saved: Any, lm: EditedLM, where: str) -> None:
    """IncompatibleError unless ``saved`` (an artefact's or a state's ``lm`` record) describes ``lm``.

    Hidden size is required; vocabulary size and fingerprint are compared when recorded. The name is
    not what matters: an LM of another name (a local copy, a mirror) is accepted, with a warning,
    when the record holds a fingerprint and it matches; without one the names must agree."""
    mismatch = lm_mismatch(saved, lm)
    if mismatch is not None:
        raise IncompatibleError(f"{where} {mismatch}")
    if saved.get("name") != lm.spec.name:
        log.warning("%s was made for LM %r; using it with %r, which has the same sizes, architecture and "
                    "tokenizer", where, saved.get("name"), lm.spec.name)


def lm_mismatch(saved: Any, lm: EditedLM) -> str | None:
    """Why ``saved`` (an ``lm`` record) does not describe ``lm`` ("was made for ..."); None when it does."""
    if not isinstance(saved, dict) or not isinstance(saved.get("hidden_size"), int):
        return f"does not say which LM it was made for (got {saved!r})"
    if saved["hidden_size"] != lm.hidden_size:
        return (f"was made for an LM with hidden size {saved['hidden_size']} ({saved.get('name')}); "
                f"this LM ({lm.spec.name}) has hidden size {lm.hidden_size}")
    if saved.get("name") != lm.spec.name and "fingerprint" not in saved:
        return f"was made for LM {saved.get('name')!r}, not {lm.spec.name!r}"
    if "vocab_size" in saved and saved["vocab_size"] != len(lm.tokenizer):
        return f"was made for a vocabulary of {saved['vocab_size']} tokens; this LM's tokenizer has {len(lm.tokenizer)}"
    if "fingerprint" in saved and saved["fingerprint"] != lm_fingerprint(lm):
        return (f"was made for another LM ({saved.get('name')!r}, the same sizes; its tokenizer or architecture "
                f"differs: fingerprint {str(saved['fingerprint'])[:16]}...)")
    return None


def save_artifact(kind: ArtifactKind, out_dir: str | Path, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write ``tensors`` (CPU, finite) and ``meta`` as an artefact of ``kind``, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RecipeError(f"cannot export the {kind.what}: {bad[:5]} are not finite (or overflow float16)")

    def write_into(work: Path) -> None:
        safetensors.torch.save_file(tensors, str(work / kind.weights_file))
        write_json(work / kind.meta_file, meta)

    out = save_folder(out_dir, write_into, format_name=kind.format_name, format_version=FORMAT_VERSION)
    log.info("exported the %s (%.1f MB) to %s", kind.what, (out / kind.weights_file).stat().st_size / 1e6, out)
    return out


def read_artifact(kind: ArtifactKind, path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """``(meta, tensors)`` of a verified artefact of ``kind`` at ``path`` (resolved by :func:`resolve_checkpoint`)."""
    with open_folder(resolve_checkpoint(path), format_name=kind.format_name, versions=(FORMAT_VERSION,),
                     errors=kind.errors, lock=False) as folder:  # written once: no lock file in checkpoints/
        meta = read_json(folder, kind.meta_file)
        tensors = _read_weights(folder, kind)
    return meta, tensors


def load_weights(module: nn.Module, expected: dict[str, Tensor], tensors: dict[str, Tensor], where: str) -> None:
    """Copy ``tensors`` into ``module`` (``expected``: the module's own tensors they replace) after checking
    that the names and shapes match exactly; ``module`` is untouched when they do not."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{where} holds other tensors than the architecture needs: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    wrong = [f"{k}: {tuple(tensors[k].shape)} for {tuple(v.shape)}" for k, v in expected.items() if v.shape != tensors[k].shape]
    if wrong:
        raise ArtifactError(f"{where} holds tensors of the wrong shapes: {wrong[:3]}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False)


def _read_weights(folder: VerifiedFolder, kind: ArtifactKind) -> dict[str, Tensor]:
    path = folder.file(kind.weights_file)
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        raise ArtifactError(f"{path} is not a readable tensor file: {exc}") from exc
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ArtifactError(f"{path}: {bad[:5]} hold NaN or inf")
    return tensors


def _field(meta: dict, key: str, kind: ArtifactKind) -> Any:
    if key not in meta:
        raise ArtifactError(f"{kind.meta_file} of the {kind.what} has no {key!r}")
    return meta[key]


# ---- RECIPE networks ----------------------------------------------------------------------------
def save_recipe_artifact(networks: RecipeNetworks, lm: EditedLM, out_dir: str | Path, prefix_mode: PrefixMode,
                         extra: dict | None = None, statement_separator: str = DEFAULT_SEPARATOR) -> Path:
    """Write the trained RECIPE networks (fp16) + ``recipe.json`` (the LM, architecture, prefix mode, sentinel)."""
    tensors = {k: v.detach().to("cpu", torch.float16) for k, v in networks.artifact_state().items()}
    meta = {"lm": lm_meta(lm), "architecture": dataclasses.asdict(networks.arch), "prefix_mode": prefix_mode,
            "statement_separator": statement_separator, "sentinel_mode": networks.sentinel.mode,
            "threshold": networks.sentinel.threshold, **({"training": extra} if extra else {})}
    return save_artifact(RECIPE, out_dir, tensors, meta)


def load_recipe_artifact(path: str | Path, lm: EditedLM, *, sentinel_mode: str | None = None,
                         threshold: float | None = None) -> tuple[RecipeNetworks, dict]:
    """RECIPE networks from an artefact folder (verified, checked against ``lm``), and its metadata."""
    meta, tensors = read_artifact(RECIPE, path)
    check_lm(_field(meta, "lm", RECIPE), lm, f"RECIPE checkpoint {path}")
    arch = from_dict(RecipeArchitecture, _field(meta, "architecture", RECIPE), f"{path}: architecture")
    networks = RecipeNetworks.build(lm, arch, sentinel_mode=sentinel_mode or _field(meta, "sentinel_mode", RECIPE),
                                    threshold=_field(meta, "threshold", RECIPE) if threshold is None else threshold)
    load_weights(networks, networks.artifact_state(), tensors, f"RECIPE checkpoint {path}")
    return networks, meta


# ---- MEND hypernetwork --------------------------------------------------------------------------
def save_mend_artifact(networks: MENDNetworks, lm: EditedLM, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the MEND networks (g and log α float32, u/δ statistics float64) + ``mend.json``."""
    meta = {"lm": lm_meta(lm), "layers": networks.layers, "module": lm.spec.mlp_out,
            "shapes": [list(s) for s in networks.shapes], "architecture": dataclasses.asdict(networks.arch),
            "steps": [float(networks.step(k).detach()) for k in range(len(networks.layers))],
            **({"training": extra} if extra else {})}
    return save_artifact(MEND, out_dir, networks.state_dict(), meta)


def load_mend_artifact(path: str | Path, lm: EditedLM) -> tuple[MENDNetworks, dict]:
    """MEND networks from an artefact folder, checked against ``lm`` (name, sizes, edited layers and shapes)."""
    from recipe.editors.mend import MENDArchitecture, MENDNetworks, edited_shapes  # the editor imports this module

    meta, tensors = read_artifact(MEND, path)
    check_lm(_field(meta, "lm", MEND), lm, f"MEND checkpoint {path}")
    layers, n_layers = _field(meta, "layers", MEND), lm.model.config.num_hidden_layers
    if not isinstance(layers, list) or any(not isinstance(i, int) or not 0 <= i < n_layers for i in layers):
        raise IncompatibleError(f"MEND checkpoint {path} edits layers {layers}; {lm.spec.name!r} has {n_layers}")
    shapes = edited_shapes(lm, layers)
    if [list(s) for s in shapes] != _field(meta, "shapes", MEND):
        raise IncompatibleError(f"MEND checkpoint {path} was made for weights of shapes {meta['shapes']}; "
                                f"this LM's are {[list(s) for s in shapes]}")
    arch = from_dict(MENDArchitecture, _field(meta, "architecture", MEND), f"{path}: architecture")
    networks = MENDNetworks(layers, shapes, arch)
    load_weights(networks, networks.state_dict(), tensors, f"MEND checkpoint {path}")
    return networks.to(lm.device), meta


# ---- edit verifier ------------------------------------------------------------------------------
def save_verifier(verifier: EditVerifier, out_dir: str | Path, threshold: float = 0.5, extra: dict | None = None) -> Path:
    """Write the verifier's head and trained body layers (fp16) + ``verifier.json`` (architecture, seed, threshold)."""
    tensors = {k: v.detach().to("cpu", torch.float16) for k, v in verifier.artifact_state().items()}
    meta = {"architecture": dataclasses.asdict(verifier.arch), "seed": verifier.seed, "threshold": float(threshold),
            **({"training": extra} if extra else {})}
    return save_artifact(VERIFIER, out_dir, tensors, meta)


def load_verifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[EditVerifier, dict]:
    """``(verifier in eval mode, its verifier.json)`` from a verified artefact folder."""
    meta, tensors = read_artifact(VERIFIER, path)
    arch = from_dict(VerifierArchitecture, _field(meta, "architecture", VERIFIER), f"{path}: architecture")
    seed, threshold = _field(meta, "seed", VERIFIER), _field(meta, "threshold", VERIFIER)
    if not isinstance(seed, int) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ArtifactError(f"verifier artefact {path}: seed {seed!r} must be an int and threshold {threshold!r} in [0, 1]")
    verifier = EditVerifier(arch, seed=seed)
    load_weights(verifier, verifier.artifact_state(), tensors, f"verifier artefact {path}")
    return verifier.to(device).eval().requires_grad_(False), meta
