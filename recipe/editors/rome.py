"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

One MLP output projection ``W`` (out, in) of one layer is treated as a key-value memory. Each edit
computes a key k* and a value v* (``rank_one.py``, ROME §3.1) and inserts the pair with the rank-one
update that changes ``W`` least under the key covariance ``C`` (ROME eq. 2):

    W' = W + Λ (C⁻¹ k*)ᵀ,    Λ = (v* − W k*) / ((C⁻¹ k*)ᵀ k*)

so ``W' k* = v*`` exactly. Requests of one ``edit`` call are applied one after another, each on top
of the previous ones (ROME is a single-edit method). Solves run in float64.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from recipe.editors import rank_one
from recipe.editors.base import EditorConfig, WeightEditor, register_editor
from recipe.errors import RecipeError
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)


@dataclass
class RankOneConfig(EditorConfig):
    """What ROME and MEMIT share: where the key is read, how v* / δ is optimised, the key statistics.

    The defaults are the settings measured on SmolLM2 (benchmarks/results/rome_weight_decay/README.md):
    GPT-2 XL's weight_decay 0.5 and 20 steps gave zsRE T=1 reliability 0.853, weight_decay 1e-3 and 25
    steps 0.978 (20 edits)."""

    fact_token: rank_one.FactToken = "subject_last"  # key position; "last": the prompt's last token, no subject needed
    context_templates: int = 5  # how many of rank_one.CONTEXT_PREFIXES (the first is the bare prompt) k*, v* average over
    steps: int = 25  # Adam steps of the v* / δ optimisation (GPT-2 XL's ROME: 20)
    lr: float = 0.5  # Adam learning rate on δ
    kl_factor: float = 0.0625  # weight of the essence-drift KL on "{subject} is a"
    weight_decay: float = 1.0e-3  # weight of ‖δ‖²/‖m‖² (GPT-2 XL's 0.5 held δ back on SmolLM2)
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ clamp_norm_factor · ‖m‖
    stop_loss: float = 5.0e-2  # stop the δ steps once the mean target NLL is below this
    covariance: str = "wikitext"  # key statistics source: one of rank_one.COVARIANCE_SOURCES
    n_cov_samples: int = 2000  # text samples behind C = E[k kᵀ]
    counts: ClassVar[tuple[str, ...]] = ("context_templates", "steps", "n_cov_samples")


@dataclass
class ROMEConfig(RankOneConfig):
    layer: int | None = None  # edited layer; None: configs/models edit_layers.rome (SmolLM2: 5, Gemma-3: 4)


def value_options(cfg) -> rank_one.ValueOptions:
    return rank_one.ValueOptions(steps=cfg.steps, lr=cfg.lr, kl_factor=cfg.kl_factor, weight_decay=cfg.weight_decay,
                                 clamp_norm_factor=cfg.clamp_norm_factor, stop_loss=cfg.stop_loss)


def context_prefixes(cfg) -> tuple[str, ...]:
    n = len(rank_one.CONTEXT_PREFIXES)
    if not 1 <= cfg.context_templates <= n:
        raise RecipeError(f"context_templates must be in 1..{n}, got {cfg.context_templates}")
    return rank_one.CONTEXT_PREFIXES[:cfg.context_templates]


def make_covariance(lm, cfg, source: rank_one.CovarianceSource | None) -> rank_one.KeyCovariance:
    """The key statistics: the injected ``source``, else the one the config names."""
    if source is None:
        if cfg.covariance not in rank_one.COVARIANCE_SOURCES:
            raise RecipeError(f"unknown covariance source {cfg.covariance!r}; known: {sorted(rank_one.COVARIANCE_SOURCES)}")
        source = rank_one.COVARIANCE_SOURCES[cfg.covariance]()
    return rank_one.KeyCovariance(lm, source, cfg.n_cov_samples)


def check_subjects(requests: Sequence[EditRequest], fact_token: str, editor: str) -> None:
    if fact_token != "subject_last":
        return
    for r in requests:
        if r.subject is None:
            raise RecipeError(f"{editor} edits at the subject's last token and needs EditRequest.subject; "
                              f"the request {r.prompt!r} -> {r.target_new!r} has none")
        if rank_one.find_subject(r.prompt, r.subject) < 0:
            raise RecipeError(f"subject {r.subject!r} does not occur as a word in prompt {r.prompt!r}")


def rank_one_update(weight: Tensor, cov: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """ΔW = Λ (C⁻¹k*)ᵀ with Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)  (ROME eq. 2), in float64: (out, in)."""
    W, C, k, v = weight.double(), cov.double(), key.double(), value.double()
    c_inv_k = torch.linalg.solve(C, k)  # C⁻¹ k*  (in,)
    lam = (v - W @ k) / torch.dot(c_inv_k, k)  # Λ  (out,)
    return torch.outer(lam, c_inv_k)


class RankOneEditor(WeightEditor):
    """What ROME and MEMIT share: context prefixes, key covariance, the subject check on requests."""

    reuse_inputs = True  # False: full forwards at every δ step (rank_one.compute_value's reuse_prefix)

    def __init__(self, lm, config=None, covariance_source: rank_one.CovarianceSource | None = None):
        super().__init__(lm, config)
        self.prefixes = context_prefixes(self.config)
        self.covariance = make_covariance(lm, self.config, covariance_source)

    def _check(self, requests):
        requests = super()._check(requests)
        check_subjects(requests, self.config.fact_token, self.name)
        for r in requests:  # every position and length the edit will need, before anything changes
            rank_one.check_request(self.lm, r, self.prefixes, self.config.fact_token)
        return requests


@register_editor
class ROMEEditor(RankOneEditor):
    name = "rome"
    config_cls = ROMEConfig

    def __init__(self, lm, config: ROMEConfig | None = None, covariance_source: rank_one.CovarianceSource | None = None):
        super().__init__(lm, config, covariance_source)
        self.layer = self.default_layer(self.config.layer)
        self.module_path = self.lm.spec.mlp_out.format(self.layer)
        self.param_name = f"{self.module_path}.weight"
        self.editable_params = [self.param_name]
        self.lm.module(self.module_path)  # clear error if the path is wrong

    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        cfg = self.config
        cov = self.covariance(self.layer)
        for request in requests:
            key = rank_one.compute_key(self.lm, request, self.layer, self.prefixes, cfg.fact_token)
            value = rank_one.compute_value(self.lm, request, self.layer, key, self.prefixes, value_options(cfg),
                                           cfg.fact_token, reuse_prefix=self.reuse_inputs)
            weight = self.snapshot.touch(self.param_name)
            with torch.no_grad():
                weight.add_(rank_one_update(weight, cov, key, value.value).to(weight.dtype))
            log.debug("rome edit %r -> %r at layer %d: nll %.4f", request.prompt, request.target_new, self.layer,
                      value.nll)
