"""FT-L: fine-tune one MLP output projection on the new target, with an L-infinity norm bound.

For each edit, Adam minimises the NLL of the target tokens after the prompt (loss only on target
tokens, ``prompt + " " + target`` tokenised as everywhere else), changing only
``spec.mlp_out.format(layer)``; after every step the change made by this edit is clamped to
``[-norm_constraint, norm_constraint]`` element-wise (Zhu et al. 2020, as used by ROME's FT-L).
The bound is taken against the weights before this edit, so sequential edits accumulate.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from recipe.editors.base import EditorConfig, WeightEditor, register_editor
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)


@dataclass
class FTConfig(EditorConfig):
    layer: int | None = None  # decoder layer whose MLP output projection is tuned; None: configs/models edit_layers.ft
    steps: int = 40  # most Adam steps per edit
    lr: float = 5.0e-3  # Adam learning rate
    norm_constraint: float = 2.0e-2  # L-inf bound on the change per edit; 0 disables the bound
    stop_loss: float = 5.0e-2  # stop early once the mean target NLL is below this


@register_editor
class FTEditor(WeightEditor):
    name = "ft"
    config_cls = FTConfig

    def __init__(self, lm, config: FTConfig | None = None):
        super().__init__(lm, config)
        self.layer = self.default_layer(self.config.layer)
        self.param_name = f"{self.lm.spec.mlp_out.format(self.layer)}.weight"
        self.lm.module(self.lm.spec.mlp_out.format(self.layer))  # clear error if the path is wrong

    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        cfg = self.config
        weight = self.snapshot.touch(self.param_name)
        before = weight.detach().clone()
        prompts = [r.prompt for r in requests]
        targets = [r.target_new for r in requests]
        weight.requires_grad_(True)
        opt = torch.optim.Adam([weight], lr=cfg.lr)
        try:
            for step in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                logp, _, _, mask = self.lm.target_logprobs(prompts, targets, prefixes=None)
                loss = -(logp * mask).sum() / mask.sum()  # mean NLL over target tokens
                if loss.item() < cfg.stop_loss:
                    break
                loss.backward()
                opt.step()
                if cfg.norm_constraint > 0:
                    with torch.no_grad():
                        delta = (weight - before).clamp_(-cfg.norm_constraint, cfg.norm_constraint)
                        weight.copy_(before + delta)
            log.debug("ft edit %s: %d steps, loss %.4f", ids, step + 1, loss.item())
        finally:
            weight.requires_grad_(False)
