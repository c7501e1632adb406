"""AlphaEdit: Null-Space Constrained Knowledge Editing (Fang et al., ICLR 2025).

MEMIT's multi-layer update (``memit.py``) with the perturbation projected onto the null space of the
preserved knowledge's keys, so that what the model already knows is left as it was.

For one layer with weight ``W`` (d_out, d_in) and preserved keys ``K0``:

- ``K0 K0ᵀ`` is the key second moment ``C = E[k kᵀ]`` that ROME and MEMIT already use
  (``rank_one.KeyCovariance``: the same cached file);
- ``{U, Λ, Uᵀ} = SVD(K0 K0ᵀ)``; ``Û`` keeps the eigenvectors whose eigenvalues are below
  ``nullspace_threshold`` (the paper takes 1e-2), and ``P = Û Ûᵀ`` (d_in, d_in). Then
  ``Δ P K0 ≈ 0`` for every ``Δ`` (AlphaEdit, null-space projection): a perturbation ``ΔP`` leaves the preserved outputs
  ``W K0`` unchanged;
- the update that writes the new keys ``K1`` (d_in, n) onto the residuals ``R`` (d_out, n) while
  keeping the keys of earlier edits ``K_p`` where they are (sequential editing) is (AlphaEdit eq. 14)

      Δ_AlphaEdit = R K1ᵀ P (K_p K_pᵀ P + K1 K1ᵀ P + α I)⁻¹

  with ``α = l2`` (eq. 14 writes ``I``; the reference code weighs it by ``L2``). Its rows lie in the
  range of ``P``, so ``Δ_AlphaEdit (I − P) = 0`` exactly; the update is multiplied by ``P`` once more
  to drop float rounding.

``K_p K_pᵀ`` is accumulated per layer in the editor's state (``state_dict``) after every batch, from
the keys of that batch. ``P`` is computed once per layer and cached on disk beside the covariance,
keyed by the covariance's sha256 (a fingerprint of the model below the layer and of the text it was
measured on), the layer and the threshold. ``norm_anchor`` rescales each solved value vector
``v* = W k* + δ`` to the norm of the unedited weights' value ``‖W₀ k*‖`` at that position before
the residuals are spread over the layers (keeps value norms from growing over long edit sequences).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from recipe.editors import rank_one
from recipe.editors.base import register_editor
from recipe.editors.memit import MEMITEditor
from recipe.editors.rome import RankOneConfig
from recipe.errors import IncompatibleError, RecipeError
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)


@dataclass
class AlphaEditConfig(RankOneConfig):
    """MEMIT's key and δ settings (the shared rank-one base) plus the null-space projection's own."""

    layers: list[int] = field(default_factory=list)  # critical layers; empty: configs/models edit_layers.memit
    nullspace_threshold: float = 1.0e-2  # eigenvalues of K0 K0ᵀ below this span the editable null space (paper: 1e-2)
    l2: float = 10.0  # α: weight of ‖ΔP‖² in eq. 14 (the reference code's L2)
    norm_anchor: bool = False  # rescale each solved value vector to the unedited weights' value norm there


def null_space_projector(cov: Tensor, threshold: float) -> Tensor:
    """P = Û Ûᵀ (AlphaEdit, null-space projection) from ``cov`` = K0 K0ᵀ (d, d): float64 (d, d).

    ``{U, Λ, Uᵀ} = SVD(K0 K0ᵀ)``; for a symmetric positive semi-definite matrix the SVD is its
    eigendecomposition, computed here with ``eigh``. ``Û``: the eigenvectors of eigenvalues < ``threshold``.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())  # Λ (d,), U (d, d)
    kept = eigenvectors[:, eigenvalues < threshold]  # Û (d, r)
    log.info("null space: %d of %d key directions below %g", kept.shape[1], cov.shape[0], threshold)
    return kept @ kept.T


def alphaedit_layer_update(projector: Tensor, keys: Tensor, resid: Tensor, prior: Tensor | None,
                           l2: float) -> Tensor:
    """Δ = R K1ᵀ P (K_p K_pᵀ P + K1 K1ᵀ P + α I)⁻¹ P (AlphaEdit eq. 14) in float64: (d_out, d_in).

    ``projector`` P (d_in, d_in), ``keys`` K1 (d_in, n), ``resid`` R (d_out, n), ``prior`` K_p K_pᵀ
    (d_in, d_in) or None before the first edit, ``l2`` α. With P and K Kᵀ symmetric, Δᵀ solves
    ``(P (K_p K_pᵀ + K1 K1ᵀ) + α I) Δᵀ = P K1 Rᵀ``: one (d_in, d_in) solve with n right-hand sides.
    """
    P, K, R = projector.double(), keys.double(), resid.double()
    KKt = K @ K.T if prior is None else prior.double() + K @ K.T  # K_p K_pᵀ + K1 K1ᵀ
    A = P @ KKt + l2 * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    update = torch.linalg.solve(A, P @ K @ R.T).T  # (d_out, d_in)
    return update @ P  # exact in exact arithmetic; drops rounding outside the null space


class NullSpaceProjectors:
    """P per layer from a :class:`rank_one.KeyCovariance`, on the object and (for cacheable sources)
    on disk beside the covariance file: ``<layer>-<n_samples>[-tag]-nullspace-<threshold>.safetensors``,
    used only when its stored covariance sha256 and threshold match."""

    def __init__(self, covariance: rank_one.KeyCovariance, threshold: float):
        if not threshold > 0:
            raise RecipeError(f"nullspace_threshold must be > 0, got {threshold}")
        self.covariance, self.threshold = covariance, threshold
        self._projectors: dict[int, Tensor] = {}

    def path(self, layer: int) -> Path:
        cov = self.covariance.path(layer)
        return cov.with_name(f"{cov.stem}-nullspace-{self.threshold:g}.safetensors")

    def __call__(self, layer: int) -> Tensor:
        if layer not in self._projectors:
            self._projectors[layer] = self._load_or_compute(layer)
        return self._projectors[layer]

    def _load_or_compute(self, layer: int) -> Tensor:
        from safetensors.torch import save_file

        cov = self.covariance(layer)
        meta = {"model": self.covariance.lm.spec.name, "layer": str(layer), "threshold": repr(self.threshold),
                "covariance_sha256": hashlib.sha256(cov.double().cpu().numpy().tobytes()).hexdigest()}
        path, cacheable = self.path(layer), self.covariance.source.cacheable
        cached = self._load(path, meta) if cacheable and path.exists() else None
        if cached is not None:
            log.info("null-space projector of layer %d from %s", layer, path)
            return cached.to(cov.device)
        projector = null_space_projector(cov, self.threshold)
        if cacheable:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            save_file({"projector": projector.cpu().contiguous()}, str(partial), metadata=meta)
            os.replace(partial, path)  # atomic: a reader sees the old file or the whole new one
        return projector

    @staticmethod
    def _load(path: Path, meta: dict[str, str]) -> Tensor | None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                if f.metadata() != meta:
                    log.info("cached projector %s is for another covariance or threshold; recomputing", path)
                    return None
                return f.get_tensor("projector")
        except (OSError, SafetensorError) as err:
            log.warning("unreadable cached projector %s (%s); recomputing", path, err)
            return None


@register_editor
class AlphaEditEditor(MEMITEditor):
    name = "alphaedit"
    config_cls = AlphaEditConfig

    def __init__(self, lm, config: AlphaEditConfig | None = None,
                 covariance_source: rank_one.CovarianceSource | None = None):
        super().__init__(lm, config, covariance_source)
        if not self.config.l2 > 0:
            raise RecipeError(f"l2 must be > 0 (eq. 14's α I keeps the solve regular), got {self.config.l2}")
        self.projectors = NullSpaceProjectors(self.covariance, self.config.nullspace_threshold)
        self.prior_keys: dict[int, Tensor] = {}  # layer -> K_p K_pᵀ (d_in, d_in) float64 over earlier edits

    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        projectors = {layer: self.projectors(layer) for layer in self.layers}  # before any weight moves
        values = self._values(requests)
        deltas = [self._anchored(r, v) if self.config.norm_anchor else v.delta for r, v in zip(requests, values)]
        z = self._targets(requests, deltas)  # target hidden states (n, H), MEMIT eq. 16-17
        batch_keys = {}
        for i, layer in enumerate(self.layers):
            keys = self._keys(requests, layer)  # K1 (d_in, n): the layers below are already updated, as after the batch
            resid = self._layer_residual(requests, z, i, layer)  # R (d_out, n), MEMIT Alg. 1 line 9
            weight = self.snapshot.touch(f"{self.lm.spec.mlp_out.format(layer)}.weight")
            update = alphaedit_layer_update(projectors[layer], keys, resid, self.prior_keys.get(layer), self.config.l2)
            with torch.no_grad():
                weight.add_(update.to(weight.dtype))
            batch_keys[layer] = keys.double() @ keys.double().T
            log.debug("alphaedit layer %d: |R| %.3f, |ΔP| %.3f", layer, resid.norm().item(), update.norm().item())
        for layer, kkt in batch_keys.items():  # K_p ← [K_p  K1] for the next batch, once this one is in
            self.prior_keys[layer] = kkt if layer not in self.prior_keys else self.prior_keys[layer] + kkt

    def _anchored(self, request: EditRequest, value: rank_one.Value) -> Tensor:
        """δ' such that v*' = W k* + δ' = v* · ‖W₀ k*‖ / ‖v*‖ (norm-anchor scaling): the solved value
        keeps its direction and takes the norm of the unedited weights' value at the fact token."""
        last = self.layers[-1]
        name = f"{self.lm.spec.mlp_out.format(last)}.weight"
        unedited = self.snapshot.original(name)  # W₀ (d_out, d_in)
        key = rank_one.compute_key(self.lm, request, last, self.prefixes, self.config.fact_token)  # k* (d_in,)
        anchor = (unedited @ key).norm()  # ‖W₀ k*‖
        current = value.value - value.delta  # W k* (d_out,)
        return value.value * (anchor / value.value.norm()) - current

    def rollback(self) -> None:
        super().rollback()
        self.prior_keys.clear()

    def state_dict(self) -> dict:
        prior = {str(layer): kkt.detach().cpu().clone() for layer, kkt in self.prior_keys.items()}
        return {**super().state_dict(), "prior_keys": prior}

    def load_state_dict(self, state: dict) -> None:
        prior = {int(layer): kkt for layer, kkt in state.get("prior_keys", {}).items()}
        if not set(prior) <= set(self.layers):
            raise IncompatibleError(f"state holds earlier keys of layers {sorted(prior)}; this editor edits {self.layers}")
        for layer, kkt in prior.items():
            d_in = self.lm.model.get_parameter(f"{self.lm.spec.mlp_out.format(layer)}.weight").shape[1]
            if tuple(kkt.shape) != (d_in, d_in):
                raise IncompatibleError(f"earlier keys of layer {layer} have shape {tuple(kkt.shape)}, need {(d_in, d_in)}")
        super().load_state_dict(state)
        self.prior_keys = {layer: kkt.to(self.lm.device, torch.float64) for layer, kkt in prior.items()}
