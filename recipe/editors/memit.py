"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023), batched over requests and layers.

For a batch of n requests and critical layers ``l_1 < ... < l_L`` (MEMIT Alg. 1):

1. for each request, ``δ_i`` at the ``mlp_out`` output of the last layer ``l_L`` (ROME eq. 4, shared
   code in ``rank_one.py``); since that output is added straight into the residual stream, the
   target hidden state there is ``z_i = h_i^{l_L} + δ_i`` (MEMIT eq. 16-17);
2. for each layer ``l`` in order, on the model as already updated at the layers below:
   keys ``K`` (d_in, n) at ``l``, residual ``R = (z − h^{l_L}) / (L − index(l))`` (d_out, n) spread
   over the layers left (Alg. 1 line 9), and the update that minimises
   ``‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ)`` (MEMIT eq. 14):

       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹,   i.e.   ΔW (λ C + K Kᵀ) = R Kᵀ

   with ``C = E[k kᵀ]`` from ``rank_one.KeyCovariance`` and ``λ = mom2_update_weight``.
Keys are averaged over the context prefixes as in ROME; ``z`` and ``h`` are read on the bare prompt.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from recipe.editors import rank_one
from recipe.editors.base import register_editor
from recipe.editors.rome import RankOneConfig, RankOneEditor, value_options
from recipe.errors import RecipeError
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)


@dataclass
class MEMITConfig(RankOneConfig):
    """λ = 1000 on SmolLM2: GPT-J's 15000 wrote only s/(λ+s) ≈ 1/3 of each layer's residual there (subject
    keys: s = kᵀC⁻¹k ≈ 4,400-7,800), so no edit landed."""

    layers: list[int] = field(default_factory=list)  # critical layers; empty: configs/models edit_layers.memit
    mom2_update_weight: float = 1000.0  # λ: weight of the preserved keys' covariance (MEMIT eq. 14)


def memit_layer_update(cov: Tensor, keys: Tensor, resid: Tensor, mom2_weight: float,
                       cov_cholesky: Tensor | None = None) -> Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (MEMIT eq. 14) in float64; keys (d_in, n), resid (d_out, n) -> (d_out, d_in).

    ``cov_cholesky``: the Cholesky factor of λC (float64), computed once per layer. Then, by the
    Woodbury identity, (λC + K Kᵀ)⁻¹ K = Y (I + Kᵀ Y)⁻¹ with Y = (λC)⁻¹ K: two triangular solves
    against K (O(d² n)) instead of a dense (d, d) solve per edit (O(d³)).
    """
    K, R = keys.double(), resid.double()
    if cov_cholesky is not None:
        Y = torch.cholesky_solve(K, cov_cholesky)  # (λC)⁻¹ K  (d_in, n)
        AK = torch.linalg.solve(torch.eye(K.shape[1], dtype=K.dtype, device=K.device) + K.T @ Y, Y.T).T  # A⁻¹ K
        return R @ AK.T  # R Kᵀ A⁻¹ = R (A⁻¹ K)ᵀ, A symmetric
    A = mom2_weight * cov.double() + K @ K.T  # λC + K Kᵀ  (d_in, d_in), symmetric
    return torch.linalg.solve(A, K @ R.T).T  # (A⁻¹ K Rᵀ)ᵀ = R Kᵀ A⁻¹


@register_editor
class MEMITEditor(RankOneEditor):
    name = "memit"
    config_cls = MEMITConfig

    def __init__(self, lm, config: MEMITConfig | None = None, covariance_source: rank_one.CovarianceSource | None = None):
        super().__init__(lm, config, covariance_source)
        layers = list(self.config.layers) or list(self.lm.spec.edit_layers.get("memit") or [])
        if not layers:
            raise RecipeError(f"no layers configured for 'memit' and model {lm.spec.name!r} has no edit_layers.memit "
                              "in configs/models/")
        self.layers = sorted({self.default_layer(layer) for layer in layers})
        self._cholesky: dict[int, Tensor | None] = {}  # layer -> Cholesky factor of λC (None: not positive definite)
        for layer in self.layers:
            self.lm.module(self.lm.spec.mlp_out.format(layer))  # clear error if the path is wrong
        self.editable_params = [f"{self.lm.spec.mlp_out.format(layer)}.weight" for layer in self.layers]

    def _hidden(self, requests: Sequence[EditRequest], layer: int) -> Tensor:
        """Residual stream after decoder ``layer`` at each request's fact token, bare prompt: (n, H)."""
        texts = [r.prompt for r in requests]
        idxs = [rank_one.fact_index(self.lm, r.prompt, r.subject, self.config.fact_token) for r in requests]
        return rank_one.capture(self.lm, f"{self.lm.spec.layers}.{layer}", texts, idxs, what="output")

    def _values(self, requests: Sequence[EditRequest]) -> list[rank_one.Value]:
        """δ_i (and v*_i) at the last layer, on the model before this batch (Alg. 1 lines 2-7)."""
        cfg, last = self.config, self.layers[-1]
        values = []
        for r in requests:
            key = rank_one.compute_key(self.lm, r, last, self.prefixes, cfg.fact_token)
            values.append(rank_one.compute_value(self.lm, r, last, key, self.prefixes, value_options(cfg),
                                                 cfg.fact_token, reuse_prefix=self.reuse_inputs))
        return values

    def _mlp_output(self, requests: Sequence[EditRequest], layer: int) -> Tensor:
        """Decoder ``layer``'s MLP output at each request's fact token, bare prompt: (n, H)."""
        texts = [r.prompt for r in requests]
        idxs = [rank_one.fact_index(self.lm, r.prompt, r.subject, self.config.fact_token) for r in requests]
        return rank_one.capture(self.lm, self.lm.spec.mlp_out.format(layer), texts, idxs, what="output")

    def _targets(self, requests: Sequence[EditRequest], deltas: Sequence[Tensor]) -> Tensor:
        """z (n, H): the residual stream after the last edited layer that the solved values ask for (eq. 16-17).
        δ was solved at the MLP output; where a norm follows it (Gemma-3) the stream sees δ through it."""
        last, delta = self.layers[-1], torch.stack(list(deltas))
        norm = rank_one.post_mlp_norm(self.lm, last)
        if norm is not None:
            delta = rank_one.through_norm(norm, self._mlp_output(requests, last), delta)
        return self._hidden(requests, last) + delta

    def _layer_residual(self, requests: Sequence[EditRequest], z: Tensor, i: int, layer: int) -> Tensor:
        """R (d_out, n): the share of the way to z left for ``layer``, the i-th edited layer (Alg. 1 line 9), as a
        change of its MLP output (through the inverse of a norm that follows it, to first order)."""
        share = (z - self._hidden(requests, self.layers[-1])) / (len(self.layers) - i)  # (n, H)
        norm = rank_one.post_mlp_norm(self.lm, layer)
        if norm is not None:
            share = rank_one.before_norm(norm, self._mlp_output(requests, layer), share)
        return share.T

    def _keys(self, requests: Sequence[EditRequest], layer: int) -> Tensor:
        """K (d_in, n): each request's key at ``layer``, averaged over the context prefixes."""
        return torch.stack([rank_one.compute_key(self.lm, r, layer, self.prefixes, self.config.fact_token)
                            for r in requests], dim=1)

    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        z = self._targets(requests, [v.delta for v in self._values(requests)])  # targets (n, H)
        for i, layer in enumerate(self.layers):
            keys = self._keys(requests, layer)  # K (d_in, n)
            resid = self._layer_residual(requests, z, i, layer)  # R (d_out, n)
            weight = self.snapshot.touch(f"{self.lm.spec.mlp_out.format(layer)}.weight")
            update = memit_layer_update(self.covariance(layer), keys, resid, self.config.mom2_update_weight,
                                        self._cov_cholesky(layer))
            with torch.no_grad():
                weight.add_(update.to(weight.dtype))
            log.debug("memit layer %d: |R| %.3f, |ΔW| %.3f", layer, resid.norm().item(), update.norm().item())

    def _cov_cholesky(self, layer: int) -> Tensor | None:
        """The Cholesky factor of λC for ``layer``, once; None where λC is not positive definite (dense solve)."""
        if layer not in self._cholesky:
            factor, info = torch.linalg.cholesky_ex(self.config.mom2_update_weight * self.covariance(layer).double())
            self._cholesky[layer] = factor if int(info) == 0 else None
            if int(info) != 0:
                log.info("memit: λC of layer %d is not positive definite; dense solve per edit", layer)
        return self._cholesky[layer]
