"""FT-L: fine-tune one MLP output projection on the new target, with an L-infinity norm bound.

For each edit, Adam minimises the NLL of the target tokens after the prompt (loss only on target
tokens, ``prompt + " " + target`` tokenised as everywhere else), changing only
``spec.mlp_out.format(layer)``; after every step the change made by this edit is clamped to
``[-norm_constraint, norm_constraint]`` element-wise (Zhu et al. 2020, as used by ROME's FT-L).
The bound is taken against the weights before this edit, so sequential edits accumulate. The
requests of one ``edit`` call are one objective; its gradient is accumulated over chunks of
``batch_size`` requests, so memory does not grow with the size of the call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Sequence

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
    batch_size: int = 8  # requests per forward pass; an edit() call of more is run in chunks (same result)
    counts: ClassVar[tuple[str, ...]] = ("steps", "batch_size")


@register_editor
class FTEditor(WeightEditor):
    name = "ft"
    config_cls = FTConfig

    def __init__(self, lm, config: FTConfig | None = None):
        super().__init__(lm, config)
        self.layer = self.default_layer(self.config.layer)
        self.param_name = f"{self.lm.spec.mlp_out.format(self.layer)}.weight"
        self.lm.module(self.lm.spec.mlp_out.format(self.layer))  # clear error if the path is wrong
        self.editable_params = [self.param_name]

    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        cfg = self.config
        weight = self.snapshot.touch(self.param_name)
        before = weight.detach().clone()
        chunks = [requests[s:s + cfg.batch_size] for s in range(0, len(requests), cfg.batch_size)]
        n_tokens = sum(len(self.lm.target_ids(r.target_new)) for r in requests)
        weight.requires_grad_(True)
        opt = torch.optim.Adam([weight], lr=cfg.lr)
        try:
            for step in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                loss = sum(self._accumulate(chunk, n_tokens) for chunk in chunks)  # mean NLL over all target tokens
                if loss < cfg.stop_loss:
                    break
                opt.step()
                if cfg.norm_constraint > 0:
                    with torch.no_grad():
                        delta = (weight - before).clamp_(-cfg.norm_constraint, cfg.norm_constraint)
                        weight.copy_(before + delta)
            log.debug("ft edit %s: %d steps, loss %.4f", ids, step + 1, loss)
        finally:
            weight.requires_grad_(False)
            weight.grad = None

    def _accumulate(self, chunk: Sequence[EditRequest], n_tokens: int) -> float:
        """Add the gradient of this chunk's share of the mean target NLL; returns that share."""
        logp, _, _, mask = self.lm.target_logprobs([r.prompt for r in chunk], [r.target_new for r in chunk],
                                                   prefixes=None)  # (B, L) each, B <= batch_size
        loss = -(logp * mask).sum() / n_tokens
        loss.backward()
        return loss.item()
