"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022, "Fast Model Editing at Scale").

For an edited weight ``W`` (d_out, d_in) the fine-tuning gradient of the edit loss over one batch is a
sum of rank-1 terms, one per token position i (MEND eq. 1):

    ∇_W L = Σ_i δ_i u_iᵀ          u_i: the layer's input (d_in), δ_i = ∂L/∂(W u_i): its output gradient (d_out)

A small network g maps each normalised pair to pseudo-activations and pseudo-deltas (MEND eq. 3):

    z_i = [ (u_i − μ_u) / σ_u ; (δ_i − μ_δ) / σ_δ ]               running statistics (MEND sec. 3.1)
    h ← h + U σ(s_ℓ ⊙ (V h + b) + o_ℓ)   for each of ``blocks``   rank-r residual blocks, U = 0 at init
    ũ_i = μ_u + σ_u ⊙ h_u,  δ̃_i = μ_δ + σ_δ ⊙ h_δ                 (h = [h_u ; h_δ])

and the edit is ``W ← W − α_ℓ Σ_i δ̃_i ũ_iᵀ`` with a learned step α_ℓ per layer (MEND eq. 4). One g
is shared by the edited layers of one shape with a per-layer scale s_ℓ and shift o_ℓ (the paper's
"shared" variant). Mapping g's output back through the normalisation is our choice: with U = 0 MEND
is exactly one gradient step of size α (a test checks it), so training starts from fine-tuning.

Edited modules: the MLP output projections ``spec.mlp_out`` (``down_proj``) of ``edit_layers.mend``
(SmolLM2: the last three layers). ``down_proj`` rather than ``up_proj``: it is the projection that
writes into the residual stream (the key → value memory that ROME/MEMIT/FT edit here too, named once
in ``configs/models/``), and both give g the same input width d_in + d_out (1,536 + 576 for SmolLM2).

Trained networks come from ``checkpoint`` (a folder written by ``python -m train.mend``); with
``checkpoint: null`` g is the identity (tests, and plain one-step fine-tuning with step α).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from recipe.artifacts import MEND, SHIPPED, load_mend_artifact, shipped_checkpoint
from recipe.editors.base import EditorConfig, WeightEditor, register_editor
from recipe.errors import IncompatibleError, RecipeError
from recipe.lm import EditedLM
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)



@dataclass
class MENDArchitecture:
    rank: int = 512  # r: width of each low-rank block of g
    blocks: int = 2  # residual low-rank blocks (the paper: 2)
    shared: bool = True  # one g per weight shape with a per-layer scale/shift; False: one g per layer
    init_step: float = 5.0e-2  # α_ℓ at initialisation (learned as log α_ℓ)


@dataclass
class MENDConfig(EditorConfig):
    checkpoint: str | None = None  # artefact folder from train.mend; "shipped": the one made for the LM; None: identity g
    layers: list[int] = field(default_factory=list)  # edited layers; empty: the checkpoint's, else edit_layers.mend
    architecture: MENDArchitecture = field(default_factory=MENDArchitecture)  # used when checkpoint is None
    seed: int = 0  # initialisation of g's first factors when checkpoint is None


# ---- the networks ------------------------------------------------------------------------------
class RunningNorm(nn.Module):
    """Per-dimension running mean / variance over every token seen in training (Chan et al. merging)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge the rows of ``x`` (N, dim) into the statistics."""
        x = x.detach().to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)  # (dim,)
        total = self.count + n
        diff = batch_mean - self.mean
        self.m2 += ((x - batch_mean) ** 2).sum(0) + diff ** 2 * self.count * n / total
        self.mean += diff * n / total
        self.count.copy_(total)

    def stats(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(mean, std); (0, 1) before two rows were seen, so an untrained g is exactly the identity."""
        if self.count.item() < 2:
            return torch.zeros_like(self.mean, dtype=dtype), torch.ones_like(self.mean, dtype=dtype)
        std = (self.m2 / self.count).sqrt().clamp_min(1e-20)
        return self.mean.to(dtype), std.to(dtype)


class LowRankBlock(nn.Module):
    """h + U σ(s_ℓ ⊙ (V h + b) + o_ℓ): rank-r residual block, the identity at init (U = 0)."""

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)  # V, b
        self.up = nn.Parameter(torch.zeros(dim, rank))  # U: zero, so g starts as the identity
        self.scale = nn.Parameter(torch.ones(n_modes, rank))  # s_ℓ
        self.shift = nn.Parameter(torch.zeros(n_modes, rank))  # o_ℓ

    def forward(self, h: Tensor, mode: int) -> Tensor:
        a = torch.relu(self.scale[mode] * self.down(h) + self.shift[mode])  # (..., r)
        return h + a @ self.up.T  # (..., dim)


class GradientTransform(nn.Module):
    """g: [u ; δ] (normalised) → [ũ ; δ̃] through ``blocks`` residual low-rank blocks."""

    def __init__(self, dim: int, arch: MENDArchitecture, n_modes: int):
        super().__init__()
        self.blocks = nn.ModuleList(LowRankBlock(dim, arch.rank, n_modes) for _ in range(arch.blocks))

    def forward(self, z: Tensor, mode: int) -> Tensor:
        for block in self.blocks:
            z = block(z, mode)
        return z


class MENDNetworks(nn.Module):
    """Everything MEND trains for one LM: g (shared per shape or per layer), normalisation statistics of
    u and δ per edited layer, and log α per edited layer. ``shapes[i]`` is (d_out, d_in) of layer i;
    the random first factors V are drawn under ``seed`` (two builds with one seed are equal)."""

    def __init__(self, layers: Sequence[int], shapes: Sequence[tuple[int, int]], arch: MENDArchitecture,
                 seed: int = 0):
        super().__init__()
        if arch.rank < 1 or arch.blocks < 1 or not arch.init_step > 0:
            raise RecipeError(f"MEND architecture needs rank >= 1, blocks >= 1 and init_step > 0; got {arch}")
        self.layers, self.shapes, self.arch = list(layers), [tuple(s) for s in shapes], arch
        keys = [f"{o}x{i}" if arch.shared else f"layer{l}" for l, (o, i) in zip(self.layers, self.shapes)]
        self.net_key = keys
        self.mode = [keys[:k].count(keys[k]) for k in range(len(keys))]  # index among layers sharing that g
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.nets = nn.ModuleDict({key: GradientTransform(sum(self.shapes[keys.index(key)]), arch, keys.count(key))
                                       for key in dict.fromkeys(keys)})
        self.u_norms = nn.ModuleList(RunningNorm(i) for _, i in self.shapes)
        self.delta_norms = nn.ModuleList(RunningNorm(o) for o, _ in self.shapes)
        self.log_step = nn.Parameter(torch.full((len(self.layers),), math.log(arch.init_step)))

    def step(self, k: int) -> Tensor:
        return self.log_step[k].exp()  # α_ℓ

    def update_stats(self, k: int, u: Tensor, delta: Tensor) -> None:
        self.u_norms[k].update(u)
        self.delta_norms[k].update(delta)

    def transform(self, k: int, u: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """(ũ, δ̃) for edited layer k from u (..., d_in) and δ (..., d_out), row by row (MEND eq. 3)."""
        mu_u, sd_u = self.u_norms[k].stats(u.dtype)
        mu_d, sd_d = self.delta_norms[k].stats(delta.dtype)
        z = torch.cat([(u - mu_u) / sd_u, (delta - mu_d) / sd_d], dim=-1)  # (..., d_in + d_out)
        h = self.nets[self.net_key[k]](z, self.mode[k])
        h_u, h_d = h.split([u.shape[-1], delta.shape[-1]], dim=-1)
        return mu_u + sd_u * h_u, mu_d + sd_d * h_d

    def weight_update(self, k: int, u: Tensor, delta: Tensor) -> Tensor:
        """α_ℓ Σ_i δ̃_i ũ_iᵀ (d_out, d_in) from the token rows u (N, d_in), δ (N, d_out) (MEND eq. 4)."""
        u_t, d_t = self.transform(k, u, delta)
        return self.step(k) * (d_t.T @ u_t)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.layers, self.shapes, dataclasses.asdict(self.arch)]).encode())
        for name, value in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


# ---- raw gradients -----------------------------------------------------------------------------
@dataclass
class GradientFactors:
    """One teacher-forced forward: per edited layer the inputs u (R, T, d_in) and output gradients
    δ (R, T, d_out) of the edit loss, plus the logits of every row (for the caller's other terms)."""

    inputs: list[Tensor]
    grads: list[Tensor]
    token_mask: Tensor  # (R, T) 1 on real (non-pad) tokens
    logits: Tensor  # (R, L, V) float32, slot j predicts target token j (targets right-aligned)
    labels: Tensor  # (R, L)
    target_mask: Tensor  # (R, L)
    loss: Tensor  # Σ over the first n_edit rows of each row's mean target NLL (detached)


def gradient_factors(lm: EditedLM, paths: Sequence[str], prompts: Sequence[str], targets: Sequence[str],
                     n_edit: int | None = None) -> GradientFactors:
    """u and δ at ``paths`` for the loss Σ_{r < n_edit} mean-NLL(target_r | prompt_r) (default: all rows).

    Only the gradient is taken (MEND does not differentiate through it); the weights are untouched.
    """
    n_edit = len(prompts) if n_edit is None else n_edit
    modules = [lm.module(p) for p in paths]
    t_ids = [lm.target_ids(t) for t in targets]
    n_slots = max(len(t) for t in t_ids)
    embeds, mask, pos = lm.embed(prompts, None, targets)
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}

    def recorder(k):
        def hook(module, args, output):
            inputs[k], outputs[k] = args[0].detach(), output
        return hook

    weights = [m.weight for m in modules]
    flags = [w.requires_grad for w in weights]
    handles = [m.register_forward_hook(recorder(k)) for k, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)  # so that the outputs at these layers are in the graph
            out = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                           logits_to_keep=lm.target_columns(n_slots), use_cache=False)
            logits = out.logits.float()  # (R, L, V)
            labels, tmask = lm.target_slots(t_ids)
            nll = -torch.log_softmax(logits[:n_edit], -1).gather(-1, labels[:n_edit, :, None])[..., 0]  # (n, L)
            loss = ((nll * tmask[:n_edit]).sum(1) / tmask[:n_edit].sum(1)).sum()
            grads = torch.autograd.grad(loss, [outputs[k] for k in range(len(modules))])
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return GradientFactors([inputs[k] for k in range(len(modules))], [g.detach() for g in grads], mask,
                           logits.detach(), labels, tmask, loss.detach())


# ---- artefacts ---------------------------------------------------------------------------------
def edited_shapes(lm: EditedLM, layers: Sequence[int]) -> list[tuple[int, int]]:
    return [tuple(lm.module(lm.spec.mlp_out.format(layer)).weight.shape) for layer in layers]


def resolve_layers(lm: EditedLM, layers: Sequence[int]) -> list[int]:
    """``layers`` or the model config's ``edit_layers.mend``, range-checked and sorted."""
    layers = list(layers) or list(lm.spec.edit_layers.get("mend") or [])
    if not layers:
        raise RecipeError(f"no layers configured for 'mend' and model {lm.spec.name!r} has no edit_layers.mend "
                          "in configs/models/")
    n = lm.model.config.num_hidden_layers
    bad = [layer for layer in layers if not -n <= layer < n]
    if bad:
        raise RecipeError(f"layers {bad} are out of range for {lm.spec.name!r} ({n} layers)")
    return sorted({layer % n for layer in layers})


# ---- the editor --------------------------------------------------------------------------------
@register_editor
class MENDEditor(WeightEditor):
    """One MEND step per ``edit`` call: raw gradient of the requests' target NLL → g → W −= α Σ δ̃ ũᵀ."""

    name = "mend"
    config_cls = MENDConfig

    def __init__(self, lm: EditedLM, config: MENDConfig | None = None):
        super().__init__(lm, config)
        if self.config.checkpoint == SHIPPED:  # recorded as the folder it resolved to
            self.config = dataclasses.replace(self.config, checkpoint=shipped_checkpoint(MEND, lm))
        cfg = self.config
        if cfg.checkpoint is None:
            layers = resolve_layers(lm, cfg.layers)
            self.networks = MENDNetworks(layers, edited_shapes(lm, layers), cfg.architecture, cfg.seed).to(lm.device)
        else:
            self.networks, _ = load_mend_artifact(cfg.checkpoint, lm)
            if cfg.layers and resolve_layers(lm, cfg.layers) != self.networks.layers:
                raise IncompatibleError(f"checkpoint {cfg.checkpoint} edits layers {self.networks.layers}; "
                                        f"the config asks for {list(cfg.layers)}")
        self.networks.eval().requires_grad_(False)
        self.paths = [lm.spec.mlp_out.format(layer) for layer in self.networks.layers]
        self.param_names = [f"{p}.weight" for p in self.paths]
        self.editable_params = self.param_names

    @property
    def info(self) -> dict:
        """What a saved state must have been made with: the edited layers and g's fingerprint."""
        return {"layers": self.networks.layers, "networks": self.networks.fingerprint()[:16]}

    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        factors = gradient_factors(self.lm, self.paths, [r.prompt for r in requests], [r.target_new for r in requests])
        keep = factors.token_mask.bool()  # (R, T): pad positions carry no gradient
        updates = []
        with torch.no_grad():
            for k in range(len(self.paths)):  # all updates from the same forward, then applied
                u = factors.inputs[k][keep].float()  # (N, d_in)
                delta = factors.grads[k][keep].float()  # (N, d_out)
                updates.append(self.networks.weight_update(k, u, delta))  # (d_out, d_in)
            for name, update in zip(self.param_names, updates):
                weight = self.snapshot.touch(name)
                weight.sub_(update.to(weight.dtype))
        log.debug("mend edit %s: pre-edit loss %.4f", ids, factors.loss.item())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mend": self.info}

    def load_state_dict(self, state: dict) -> None:
        info = self.info
        if state.get("editor") == self.name and state.get("mend") != info:
            raise IncompatibleError(f"state was made with MEND networks {state.get('mend')}; this editor has {info}")
        super().load_state_dict(state)


@contextlib.contextmanager
def per_row_edits(lm: EditedLM, paths: Sequence[str], edits: Sequence[tuple[Tensor, Tensor]], rows: Tensor):
    """Forward hooks under which row r of a batch sees ``W_k − Σ_i δ̃_i ũ_iᵀ`` of edit ``rows[r]`` at each path.

    ``edits[k] = (ũ (E, T', d_in), α_k δ̃ (E, T', d_out))`` for E edits (rows of pad tokens zero in δ̃).
    Equal to a forward with the dense edited weight (a test checks it) but never builds W − ΔW:
    (W − α δ̃ᵀ ũ) x = W x − α δ̃ᵀ (ũ x) costs O(T T' (d_in + d_out)) per row, and gradients reach g.
    """
    def editor(k):
        def hook(module, args, output):
            x = args[0]  # (R, T, d_in)
            u_t, d_t = edits[k][0][rows].to(x.dtype), edits[k][1][rows].to(x.dtype)  # (R, T', d_in), (R, T', d_out)
            return output - (x @ u_t.transpose(1, 2)) @ d_t  # (R, T, d_out)
        return hook

    handles = [lm.module(p).register_forward_hook(editor(k)) for k, p in enumerate(paths)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
