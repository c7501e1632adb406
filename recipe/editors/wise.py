"""WISE: a side memory with a router (Wang et al., NeurIPS 2024, "WISE: Rethinking the Knowledge Memory
for Lifelong Model Editing of Large Language Models").

The MLP output projection of one layer (``spec.mlp_out``, the value matrix ``W``, (d_out, d_in)) is
swapped for a :class:`WiseMemory` that keeps ``W`` as the *main memory*, untouched, and edits copies
of it, the *side memories*. For an input whose value-matrix input is ``A(x)`` (T, d_in), the activation
score of a side memory ``W'`` is (WISE, memory routing)

    Δ_act(x) = ‖A(x) · (W' − W)ᵀ‖₂,   averaged over the query's tokens,

and the router sends ``x`` to the side memory with the largest score if that exceeds ``ε``, else to the
main memory. ``ε = act_ratio · min_e Δ_act(x_e)`` over the edits ``x_e`` written so far.

Editing one request trains the current side memory (a *knowledge shard*) with SGD on the target's
teacher-forced NLL plus the paper's routing margin loss

    L_a = max(0, Δ_act(x_i) − α) + max(0, β − Δ_act(x_e)) + max(0, γ − (Δ_act(x_e) − Δ_act(x_i)))

with ``x_i`` an irrelevant input (:data:`IRRELEVANT`), its gradient masked to a random fraction ``ρ``
(``mask_ratio``) of the shard's entries, drawn per shard, and every entry kept within
``norm_constraint`` of ``W``. A shard holds ``shard_size`` edits; then a fresh one starts from ``W``
with a new mask. Every ``shards_per_merge`` full shards are merged into one side memory by TIES
(:func:`ties_merge`; WISE, knowledge sharding and merging): the side memory merged before joins with weight ``side_weight``.
Until a merge, full shards route as side memories of their own, so every edit is visible at once.

Routing sees what the causal model sees: at token ``t`` the score is the mean over the row's tokens up
to ``t`` (padding excluded, carried across cached decoding steps), so the prediction of a target's first
token is routed on the prompt alone and teacher-forced answer tokens never reach the decision for it.

``rollback`` puts the original module back; single edits cannot be undone (``remove`` is refused).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipe.editors.base import Editor, EditorConfig, register_editor
from recipe.errors import IncompatibleError, RecipeError
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)
# Irrelevant inputs x_i of the margin loss (WISE uses the data set's locality prompts; fixed text here
# keeps edits deterministic and needs nothing beyond the request). Edit i uses entry i mod len.
IRRELEVANT = ("The weather today is", "Once upon a time there was", "The recipe calls for two cups of",
              "In mathematics, a prime number is", "The meeting was moved to", "My favourite colour is")


@dataclass
class WiseConfig(EditorConfig):
    layer: int | None = None  # layer whose MLP output projection gets the side memory; None: edit_layers.wise
    steps: int = 70  # most SGD steps per edit
    lr: float = 1.0  # SGD learning rate on the shard
    mask_ratio: float = 0.2  # ρ: fraction of a shard's entries its gradient mask lets through
    norm_constraint: float = 1.0  # |W' − W| ≤ this, entry by entry, after every step
    alpha: float = 5.0  # margin loss: irrelevant inputs' Δ_act pushed below α
    beta: float = 20.0  # margin loss: the edit's Δ_act pushed above β
    gamma: float = 10.0  # margin loss: Δ_act(edit) − Δ_act(irrelevant) pushed above γ
    act_ratio: float = 0.88  # ε = act_ratio · the smallest Δ_act of an edit so far
    stop_loss: float = 5.0e-2  # stop once the target NLL is below this and the margin loss is 0
    shard_size: int = 500  # edits per knowledge shard
    shards_per_merge: int = 2  # full shards merged into the side memory at once
    density: float = 0.53  # TIES: fraction of each task vector's largest entries kept
    side_weight: float = 0.6  # TIES weight of the earlier side memory against the new shards (theirs: 1 − this)
    seed: int = 0  # seed of the shards' gradient masks
    counts: ClassVar[tuple[str, ...]] = ("steps", "shard_size", "shards_per_merge")


def ties_merge(task_vectors: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """TIES-Merging (Yadav et al. 2023) of task vectors τ_m (same shape) with weights w_m.

    Trim: keep each τ_m's ``density`` fraction of largest magnitudes. Elect: the sign of Σ w_m τ̂_m per
    entry. Disjoint merge: the w-weighted mean of the entries that agree with the elected sign.
    """
    trimmed = []
    for tau in task_vectors:
        k = max(1, int(density * tau.numel()))
        cutoff = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values  # k-th largest magnitude
        trimmed.append(torch.where(tau.abs() >= cutoff, tau, torch.zeros_like(tau)))
    w = torch.tensor(list(weights), dtype=trimmed[0].dtype, device=trimmed[0].device).view(-1, *[1] * trimmed[0].dim())
    weighted = torch.stack(trimmed) * w  # (M, ...)
    agree = (torch.sign(weighted) == torch.sign(weighted.sum(0))) & (weighted != 0)  # (M, ...)
    divisor = (w * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


class WiseMemory(nn.Module):
    """The value matrix with side memories: main output, or a side memory's where the router says so."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj  # the main memory: the original module object, put back on rollback
        self.side: Tensor | None = None  # merged side memory (d_out, d_in)
        self.pending: list[Tensor] = []  # full shards not merged yet
        self.shard = proj.weight.detach().clone()  # the shard being written
        self.shard_edits = 0  # edits in the current shard
        self.threshold = math.inf  # ε
        self.editing = False  # True while a shard trains: the output is the shard's everywhere
        self.capture = False  # keep the input in ``captured``
        self.captured: Tensor | None = None
        self.attention_mask: Tensor | None = None  # (B, T_all) of the running model call, from a model hook
        self._running: tuple[Tensor, Tensor] | None = None  # per memory and row: score sum and count so far

    def memories(self) -> list[Tensor]:
        return ([] if self.side is None else [self.side]) + self.pending + ([self.shard] if self.shard_edits else [])

    def activation(self, x: Tensor, weight: Tensor) -> Tensor:
        """Δ_act per token: ‖A(x) · (W' − W)ᵀ‖₂, shape ``x.shape[:-1]``."""
        return F.linear(x, weight - self.proj.weight).norm(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        if self.capture:
            self.captured = x.detach()
        if self.editing:
            return F.linear(x, self.shard)
        out = self.proj(x)  # (B, T, d_out)
        memories = self.memories()
        if not memories:
            return out
        best, which = self._scores(x, memories).max(0)  # (B, T)
        routed = best > self.threshold
        if not routed.any():
            return out
        side = torch.stack([F.linear(x, w) for w in memories])  # (M, B, T, d_out)
        chosen = side.gather(0, which[None, ..., None].expand(1, *out.shape))[0]
        return torch.where(routed[..., None], chosen.to(out.dtype), out)

    @torch.no_grad()
    def _scores(self, x: Tensor, memories: list[Tensor]) -> Tensor:
        """Mean Δ_act over each row's real tokens up to each position (M, B, T), continuing the sums of
        the previous call when this one extends it (cached decoding: the mask is longer than ``x``)."""
        act = torch.stack([self.activation(x, w) for w in memories]).float()  # (M, B, T)
        M, B, T = act.shape
        mask = self.attention_mask
        fits = mask is not None and mask.shape[0] == B and mask.shape[1] >= T
        valid = mask[:, -T:].float() if fits else act.new_ones(B, T)  # (B, T)
        total, count = (act * valid).cumsum(-1), valid.cumsum(-1).expand(M, B, T)
        if fits and mask.shape[1] > T and self._running is not None and self._running[0].shape == (M, B):
            total, count = total + self._running[0][..., None], count + self._running[1][..., None]
        self._running = (total[..., -1], count[..., -1])
        return total / count.clamp(min=1.0)


@register_editor
class WiseEditor(Editor):
    name = "wise"
    config_cls = WiseConfig

    def __init__(self, lm, config: WiseConfig | None = None):
        super().__init__(lm, config)
        cfg = self.config
        if not (0 < cfg.mask_ratio <= 1 and 0 < cfg.density <= 1 and 0 <= cfg.side_weight < 1):
            raise RecipeError(f"wise needs 0 < mask_ratio <= 1, 0 < density <= 1 and 0 <= side_weight < 1, got "
                              f"{cfg.mask_ratio}, {cfg.density}, {cfg.side_weight}")
        self.layer = self.default_layer(cfg.layer)
        self.path = self.lm.spec.mlp_out.format(self.layer)
        if not isinstance(self.lm.module(self.path), nn.Linear):
            raise RecipeError(f"wise needs {self.path} to be a Linear layer, got {type(self.lm.module(self.path)).__name__}")
        self.memory: WiseMemory | None = None
        self.shards_started = 0  # shards begun so far: the next mask's index
        self.edit_acts: list[float] = []  # Δ_act of every edit right after it was written
        self._hooks: list = []
        self._mask: tuple[int, Tensor] | None = None  # (shard index, gradient mask)

    # ---- module swap -------------------------------------------------------------------------
    def _install(self) -> WiseMemory:
        if self.memory is None:
            memory = WiseMemory(self.lm.module(self.path))
            self.lm.replace_module(self.path, memory)
            self._hooks = [self.lm.model.register_forward_pre_hook(self._see_mask, with_kwargs=True),
                           self.lm.model.register_forward_hook(self._forget_mask)]
            self.memory = memory
        return self.memory

    def _see_mask(self, module, args, kwargs) -> None:
        self.memory.attention_mask = kwargs.get("attention_mask")

    def _forget_mask(self, module, args, output) -> None:
        self.memory.attention_mask = None

    def rollback(self) -> None:
        if self.memory is not None:
            for hook in self._hooks:
                hook.remove()
            self.lm.replace_module(self.path, self.memory.proj)
            self.memory, self._hooks = None, []
        self.shards_started, self.edit_acts, self._next_id = 0, [], 0

    # ---- editing -----------------------------------------------------------------------------
    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        memory = self._install()
        for request, edit_id in zip(requests, ids):
            self._edit_one(memory, request, IRRELEVANT[edit_id % len(IRRELEVANT)])

    def _edit_one(self, memory: WiseMemory, request: EditRequest, irrelevant: str) -> None:
        x_edit, x_irrelevant = self._inputs(memory, request.prompt), self._inputs(memory, irrelevant)  # (T, d_in)
        shard = self._train(memory, request, x_edit, x_irrelevant)
        self.edit_acts.append(memory.activation(x_edit, shard).mean().item())
        memory.threshold = self.config.act_ratio * min(self.edit_acts)  # ε
        memory.shard, memory.shard_edits = shard, memory.shard_edits + 1
        if memory.shard_edits == self.config.shard_size:  # the shard is full: a fresh one from W
            memory.pending.append(shard)
            memory.shard, memory.shard_edits = memory.proj.weight.detach().clone(), 0
            self.shards_started += 1
            if len(memory.pending) == self.config.shards_per_merge:
                self._merge(memory)
        log.debug("wise: Δ_act %.3f, ε %.3f, %d edits in the shard", self.edit_acts[-1], memory.threshold,
                  memory.shard_edits)

    def _train(self, memory: WiseMemory, request: EditRequest, x_edit: Tensor, x_irrelevant: Tensor) -> Tensor:
        cfg, W = self.config, memory.proj.weight.detach()
        shard = memory.shard.clone().requires_grad_(True)
        mask = self._grad_mask(W)
        opt = torch.optim.SGD([shard], lr=cfg.lr)
        memory.editing, original = True, memory.shard
        try:
            memory.shard = shard
            for _ in range(cfg.steps):
                logp, _, _, tmask = self.lm.target_logprobs([request.prompt], [request.target_new], prefixes=None)
                nll = -(logp * tmask).sum() / tmask.sum()
                act_e = memory.activation(x_edit, shard).mean()  # Δ_act(x_e)
                act_i = memory.activation(x_irrelevant, shard).mean()  # Δ_act(x_i)
                margin = F.relu(act_i - cfg.alpha) + F.relu(cfg.beta - act_e) + F.relu(cfg.gamma - (act_e - act_i))  # L_a
                if nll.item() < cfg.stop_loss and margin.item() == 0:
                    break
                opt.zero_grad(set_to_none=True)
                (nll + margin).backward()
                shard.grad.mul_(mask)  # the shard's random gradient mask
                opt.step()
                with torch.no_grad():
                    shard.copy_(torch.clamp(shard, W - cfg.norm_constraint, W + cfg.norm_constraint))
        finally:
            memory.editing, memory.shard = False, original
        log.debug("wise edit %r -> %r: nll %.4f, margin %.4f", request.prompt, request.target_new, nll.item(), margin.item())
        return shard.detach()

    def _grad_mask(self, W: Tensor) -> Tensor:
        """The current shard's gradient mask: a seeded random ``mask_ratio`` fraction of W's entries."""
        if self._mask is None or self._mask[0] != self.shards_started:
            gen = torch.Generator().manual_seed(self.config.seed + self.shards_started)
            mask = (torch.rand(W.shape, generator=gen) < self.config.mask_ratio).to(W.device, W.dtype)
            self._mask = (self.shards_started, mask)
        return self._mask[1]

    def _merge(self, memory: WiseMemory) -> None:
        """Side memory ← W + TIES(τ of the full shards, and of the earlier side memory)."""
        W, n = memory.proj.weight.detach(), len(memory.pending)
        taus = [s - W for s in memory.pending]
        weights = [1.0 / n] * n
        if memory.side is not None:
            taus.append(memory.side - W)
            weights = [(1 - self.config.side_weight) / n] * n + [self.config.side_weight]
        memory.side = W + ties_merge(taus, weights, self.config.density)
        memory.pending = []

    @torch.no_grad()
    def _inputs(self, memory: WiseMemory, text: str) -> Tensor:
        """A(x): the value matrix's input at every token of ``text`` (T, d_in)."""
        memory.capture = True
        try:
            embeds, mask, pos = self.lm.embed([text], prefixes=None)
            self.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False)
            return memory.captured[0].clone()
        finally:
            memory.capture, memory.captured = False, None

    # ---- all or nothing, state ---------------------------------------------------------------
    def _savepoint(self) -> Callable[[], None]:
        state = self.state_dict()
        return lambda: self.load_state_dict(state)

    def state_dict(self) -> dict:
        memory, copy = self.memory, lambda t: None if t is None else t.detach().cpu().clone()
        saved = {} if memory is None else {"side": copy(memory.side), "pending": [copy(p) for p in memory.pending],
                                           "shard": copy(memory.shard), "shard_edits": memory.shard_edits}
        return {**super().state_dict(), "layer": self.layer, "shards_started": self.shards_started,
                "edit_acts": list(self.edit_acts), "memory": saved}

    def load_state_dict(self, state: dict) -> None:
        """Replace the side memories by the saved ones."""
        if int(state.get("layer", self.layer)) != self.layer:
            raise IncompatibleError(f"state was made for layer {state.get('layer')}, this editor edits {self.layer}")
        saved = state.get("memory") or {}
        proj = self.lm.module(self.path) if self.memory is None else self.memory.proj
        shape = tuple(proj.weight.shape)
        tensors = [t for t in [saved.get("side"), saved.get("shard"), *saved.get("pending", [])] if t is not None]
        if any(tuple(t.shape) != shape for t in tensors):
            raise IncompatibleError(f"saved side memories have shapes {[tuple(t.shape) for t in tensors]}, "
                                    f"this model's value matrix {shape}")
        super().load_state_dict(state)  # checks the editor and the model; changes nothing if it raises
        next_id = self._next_id
        self.rollback()
        self._next_id, self.shards_started = next_id, int(state.get("shards_started", 0))
        self.edit_acts = [float(a) for a in state.get("edit_acts", [])]
        if not saved:
            return
        memory, ref = self._install(), proj.weight
        memory.side = None if saved.get("side") is None else saved["side"].to(ref.device, ref.dtype)
        memory.pending = [p.to(ref.device, ref.dtype) for p in saved.get("pending", [])]
        memory.shard, memory.shard_edits = saved["shard"].to(ref.device, ref.dtype), int(saved["shard_edits"])
        memory.threshold = self.config.act_ratio * min(self.edit_acts) if self.edit_acts else math.inf
