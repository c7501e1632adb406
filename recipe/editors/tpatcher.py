"""T-Patcher: new FFN neurons per edit (Huang et al. 2023, "Transformer-Patcher: One Mistake worth One Neuron").

Each edit adds a patch of n neurons ``(K, b, V)``, K ∈ R^{n×d_in}, b ∈ R^n, V ∈ R^{n×d_out}, to the
MLP of one layer (default: the last layer, as in the paper), so that the MLP computes

    mlp'(x) = mlp(x) + Σ_p relu(x K_pᵀ + b_p) V_p          (x: the MLP input, after the layer norm)

``neurons: one`` is the paper's single neuron, trained to fire at every position that predicts a
target token; it adds the same vector at each, so it can write a one-token answer but rarely a
multi-token one (measured: 14 of 16 multi-token zsRE targets missed). ``neurons: per_target_token``
(the default) gives the patch one neuron per target token: neuron j is keyed to the position that
predicts token j and must stay off at the edit's other target positions, as on memory tokens.

Llama/Gemma MLPs are gated (``down(act(gate x) * up x)``), so a neuron cannot be appended to their
hidden layer with the MLP's own activation alone; the patch is an extra ReLU term on the MLP output,
computed from the MLP input. A patch whose pre-activation ``k·x + b`` is negative adds exactly 0, so
on inputs where no patch fires the output equals the unpatched MLP's bit-exactly.

Training one patch (T-Patcher §3.2, eq. 8), every earlier patch frozen:

    L = l_e + act_weight · l_a + memory_weight · (l_m1 + l_m2)
    l_e  = NLL of the target tokens after the prompt
    l_a  = mean exp(act_margin − a_e)               a_e: pre-activation at the positions that predict target tokens
    l_m1 = topk-mean exp(a_m − memory_margin)       a_m: pre-activation on every token of the memory texts
    l_m2 = topk-mean exp(a_m − a_e + gap_margin)

The memory texts are a few fixed neutral sentences (``memory_sentences``) plus the prompts of earlier
edits; texts that start with the edit's prompt are left out (their hidden states equal the edit's).
A neuron's key starts at ``x / ‖x‖²`` for its position's input x (so it starts at ``a_e = 1`` there; the
single neuron uses the prompt's last token), b and v at 0. With several neurons, ``a_e`` is each
neuron at its own position and the other target positions join ``a_m``.

Speed (same results up to float rounding): the memory texts' MLP inputs do not depend on patches at
this layer, so each text is run once and its rows are kept while the weights below stay the same; and
when the patched layer is the last one, a patch changes nothing that earlier positions or layers pass
on: the prompt's columns before its last token are run once (:class:`recipe.editors.fast_forward.FrozenPrefix`), and
where the MLP output enters the residual stream unchanged (:func:`~recipe.editors.fast_forward.mlp_output_is_residual`,
as in Llama) the layer's output ``z`` is read once too, so each training step computes only the final
norm and head on ``z + relu(x Kᵀ + b) V`` (:meth:`TPatcherEditor._step`).

The layer's MLP module is swapped for a :class:`PatchedMLP` that holds the original module; rollback
puts the original object back. Each edit id is one patch, so ``remove`` undoes single edits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence

import torch
from torch import Tensor, nn

from recipe.editors.base import Editor, EditorConfig, check_tensor, register_editor
from recipe.editors.fast_forward import FrozenPrefix, mlp_output_is_residual
from recipe.errors import IncompatibleError, RecipeError
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)

NEUTRAL_SENTENCES = (
    "It was a quiet morning and the streets were still empty.",
    "She opened the window and looked at the garden.",
    "Please remember to bring an umbrella tomorrow.",
    "The meeting has been moved to next week.",
    "He poured a cup of tea and sat down to read.",
    "Numbers can be added, subtracted, multiplied and divided.",
)


@dataclass
class TPatcherConfig(EditorConfig):
    layer: int | None = None  # layer whose MLP gets the patches; None: edit_layers.tpatcher, else the last layer
    steps: int = 100  # most Adam steps per patch
    lr: float = 1.0e-2  # Adam learning rate on (k, b, v)
    act_weight: float = 1.0  # weight of the activation loss l_a (T-Patcher's a)
    memory_weight: float = 10.0  # weight of the memory loss l_m1 + l_m2 (T-Patcher's m)
    act_margin: float = 0.0  # l_a pushes the edit pre-activation above this
    memory_margin: float = -1.0  # l_m1 pushes memory pre-activations below this (T-Patcher's β, ≤ 0)
    gap_margin: float = 1.0  # l_m2 keeps edit pre-activations this far above memory ones (T-Patcher's γ)
    memory_topk: int = 1000  # l_m1, l_m2 average their k largest terms
    memory_size: int = 1000  # most recent earlier-edit prompts kept in the memory bank
    memory_sentences: list[str] = field(default_factory=lambda: list(NEUTRAL_SENTENCES))  # fixed unrelated memory texts
    stop_loss: float = 5.0e-2  # stop once target NLL < this, the neurons fire on the edit and on no memory token
    neurons: Literal["one", "per_target_token"] = "per_target_token"  # "one": the paper's (misses multi-token targets)
    counts: ClassVar[tuple[str, ...]] = ("steps", "memory_topk", "memory_size")


@dataclass
class Patch:
    """The n neurons of one edit: keys (n, d_in), biases (n,), values (n, d_out)."""

    key: Tensor
    bias: Tensor
    value: Tensor


class PatchedMLP(nn.Module):
    """``mlp(x) + relu(x K^T + b) V`` over the frozen patches (and the one in training, if any)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp  # the original module object, put back on rollback
        self.patches: dict[EditId, Patch] = {}  # frozen patches in id order
        self.training_patch: Patch | None = None  # the patch being trained (requires grad)
        self.capture = False  # keep the last input in ``captured`` (for keys and activation losses)
        self.captured: Tensor | None = None
        self._stacked: tuple[Tensor, Tensor, Tensor] | None = None

    def add(self, edit_id: EditId, patch: Patch) -> None:
        self.patches[edit_id] = patch
        self._stacked = None

    def drop(self, edit_id: EditId) -> None:
        del self.patches[edit_id]
        self._stacked = None

    def _frozen(self) -> tuple[Tensor, Tensor, Tensor] | None:
        if self._stacked is None and self.patches:
            ps = list(self.patches.values())
            self._stacked = (torch.cat([p.key for p in ps]), torch.cat([p.bias for p in ps]),
                             torch.cat([p.value for p in ps]))  # (N, d_in), (N,), (N, d_out) over all patches
        return self._stacked

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)  # (B, T, d_out)
        if self.capture:
            self.captured = x  # (B, T, d_in)
        parts = [t for t in (self._frozen(), self._training()) if t is not None]
        if not parts:
            return out
        keys, biases, values = (torch.cat(ts) for ts in zip(*parts))
        act = torch.relu(x @ keys.T + biases)  # (B, T, n)
        return out + act @ values  # (B, T, d_out)

    def _training(self) -> tuple[Tensor, Tensor, Tensor] | None:
        p = self.training_patch
        return None if p is None else (p.key, p.bias, p.value)


def _topk_mean(x: Tensor, k: int) -> Tensor:
    x = x.reshape(-1)
    return x.topk(min(k, x.numel())).values.mean()


@register_editor
class TPatcherEditor(Editor):
    name = "tpatcher"
    config_cls = TPatcherConfig
    reuse_inputs = True  # False: full forwards for the edit and the memory texts every time (tests' reference)

    def __init__(self, lm, config: TPatcherConfig | None = None):
        super().__init__(lm, config)
        configured = self.config.layer
        if configured is None:
            configured = self.lm.spec.edit_layers.get(self.name, -1)  # the paper patches the last FFN layer
        self.layer = self.default_layer(configured)
        self.mlp_path(self.layer)  # clear error if the path is wrong
        if self.config.steps < 1:
            raise RecipeError(f"tpatcher needs steps >= 1, got {self.config.steps}")
        self.wrappers: dict[int, PatchedMLP] = {}  # layer -> installed wrapper
        self.patch_layer: dict[EditId, int] = {}  # edit id -> layer of its patch
        self.memory_prompts: list[str] = []  # prompts of earlier edits (memory bank)
        self._memory_rows: dict[str, Tensor] = {}  # memory text -> its MLP inputs at self.layer (tokens, d_in)
        self._memory_signature: object = None  # what those inputs depend on (see _input_signature)

    # ---- module swap -------------------------------------------------------------------------
    def mlp_path(self, layer: int) -> str:
        """The MLP module of ``layer``: the parent of ``spec.mlp_out`` (``model.layers.{i}.mlp``)."""
        path = self.lm.spec.mlp_out.format(layer).rsplit(".", 1)[0]
        self.lm.module(path)
        return path

    def _wrapper(self, layer: int) -> PatchedMLP:
        if layer not in self.wrappers:
            path = self.mlp_path(layer)
            wrapper = PatchedMLP(self.lm.module(path))
            self.lm.replace_module(path, wrapper)
            self.wrappers[layer] = wrapper
        return self.wrappers[layer]

    def _uninstall(self, layer: int) -> None:
        self.lm.replace_module(self.mlp_path(layer), self.wrappers.pop(layer).mlp)

    # ---- the protocol ------------------------------------------------------------------------
    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        wrapper = self._wrapper(self.layer)
        for request, edit_id in zip(requests, ids):  # one patch per request, one after another
            patch = self._train_patch(wrapper, request)
            wrapper.add(edit_id, patch)
            self.patch_layer[edit_id] = self.layer
            self.memory_prompts = (self.memory_prompts + [request.prompt])[-self.config.memory_size:]

    def _savepoint(self):
        """Undo for a failed ``edit``: drop the patches and wrappers added after now, restore the memory bank."""
        layers, patch_layer, memory = set(self.wrappers), dict(self.patch_layer), list(self.memory_prompts)

        def restore() -> None:
            for edit_id in set(self.patch_layer) - set(patch_layer):
                self.wrappers[self.patch_layer[edit_id]].drop(edit_id)
            for wrapper in self.wrappers.values():
                wrapper.training_patch, wrapper.capture, wrapper.captured = None, False, None
            for layer in set(self.wrappers) - layers:
                self._uninstall(layer)
            self.patch_layer, self.memory_prompts = patch_layer, memory

        return restore

    def remove(self, ids: Sequence[EditId]) -> None:
        unknown = [i for i in ids if i not in self.patch_layer]
        if unknown:
            raise RecipeError(f"no T-Patcher patch with edit id(s) {unknown}")
        for edit_id in dict.fromkeys(ids):  # each id once, in order
            layer = self.patch_layer.pop(edit_id)
            self.wrappers[layer].drop(edit_id)
            if not self.wrappers[layer].patches:
                self._uninstall(layer)

    def rollback(self) -> None:
        for layer in list(self.wrappers):
            self._uninstall(layer)
        self.patch_layer.clear()
        self.memory_prompts.clear()
        self._memory_rows.clear()
        self._next_id = 0

    def state_dict(self) -> dict:
        patches = [{"id": i, "layer": layer, "key": p.key.cpu().clone(), "bias": p.bias.cpu().clone(),
                    "value": p.value.cpu().clone()}
                   for layer, w in self.wrappers.items() for i, p in w.patches.items()]
        return {**super().state_dict(), "patches": sorted(patches, key=lambda d: d["id"]),
                "memory_prompts": list(self.memory_prompts)}

    def load_state_dict(self, state: dict) -> None:
        """Replace every current patch by the saved ones, checked in full first (a failure changes nothing)."""
        next_id = self._check_state(state)
        patches = [self._checked_patch(saved) for saved in state.get("patches", [])]
        memory = state.get("memory_prompts", [])
        if len({edit_id for edit_id, _, _ in patches}) != len(patches):
            raise IncompatibleError("saved patches repeat an edit id")
        if not isinstance(memory, list) or not all(isinstance(p, str) for p in memory):
            raise IncompatibleError("saved memory_prompts must be a list of strings")
        self.rollback()
        self._next_id = next_id
        for edit_id, layer, patch in patches:
            wrapper = self._wrapper(layer)
            ref = next(wrapper.mlp.parameters())
            wrapper.add(edit_id, Patch(*(t.to(ref.device, ref.dtype) for t in (patch.key, patch.bias, patch.value))))
            self.patch_layer[edit_id] = layer
        self.memory_prompts = list(memory)

    def _checked_patch(self, saved: object) -> tuple[EditId, int, Patch]:
        """(edit id, layer, patch on the CPU) of one saved patch; IncompatibleError if it does not fit this model."""
        if not isinstance(saved, dict) or not isinstance(saved.get("id"), int) or saved["id"] < 0 \
                or not isinstance(saved.get("layer"), int):
            raise IncompatibleError(f"a saved patch needs a non-negative int id and an int layer, got {saved!r:.200}")
        layer = self.default_layer(saved["layer"])
        if layer != self.layer:  # every patch this editor makes sits at its configured layer
            raise IncompatibleError(f"saved patch {saved['id']} sits at layer {layer}; this editor patches {self.layer}")
        key, bias, value = (saved.get(k) for k in ("key", "bias", "value"))
        if isinstance(key, Tensor) and key.dim() == 1:  # saved before patches had several neurons: one
            key, bias, value = key[None], bias.reshape(1), value[None]
        d = self.lm.hidden_size  # the MLP reads and writes the residual stream
        n = key.shape[0] if isinstance(key, Tensor) and key.dim() == 2 else None
        where = f"saved patch {saved['id']}"
        patch = Patch(check_tensor(key, (n, d), f"{where} key"), check_tensor(bias, (n,), f"{where} bias"),
                      check_tensor(value, (n, d), f"{where} value"))
        return saved["id"], layer, patch

    # ---- training one patch ------------------------------------------------------------------
    def _input_signature(self) -> object:
        """Equal between two calls iff this layer's MLP inputs cannot have changed: same parameters at the
        same versions and no patches below this layer; a fresh object (never equal) otherwise."""
        if not self.reuse_inputs or any(layer < self.layer for layer in self.wrappers):
            return object()
        return tuple((id(p), p._version) for p in self.lm.model.parameters())

    @torch.no_grad()
    def _memory_inputs(self, wrapper: PatchedMLP, prompt: str) -> Tensor:
        """MLP inputs (M, d_in) at every real token of the memory texts unrelated to ``prompt``."""
        texts = [t for t in [*self.config.memory_sentences, *self.memory_prompts] if not t.startswith(prompt)]
        if not texts:
            return torch.empty(0, self.lm.hidden_size, device=self.lm.device)
        signature = self._input_signature()
        if signature != self._memory_signature:
            self._memory_rows.clear()
            self._memory_signature = signature
        missing = [t for t in dict.fromkeys(texts) if t not in self._memory_rows]
        wrapper.capture = True
        try:
            for s in range(0, len(missing), self.lm.max_batch):
                batch = missing[s:s + self.lm.max_batch]
                embeds, mask, pos = self.lm.embed(batch, prefixes=None)
                self.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                              use_cache=False)
                for i, text in enumerate(batch):
                    self._memory_rows[text] = wrapper.captured[i][mask[i].bool()]  # (tokens, d_in)
        finally:
            wrapper.capture, wrapper.captured = False, None
        rows = torch.cat([self._memory_rows[t] for t in texts])  # (M, d_in)
        keep = {*self.config.memory_sentences, *self.memory_prompts}  # what later edits can still ask for
        self._memory_rows = {t: r for t, r in self._memory_rows.items() if t in keep}
        return rows

    def _edit_batch(self, request: EditRequest) -> FrozenPrefix:
        """The edit's prompt + target. With the last layer patched (a patch there changes only each
        position's own logits), the prompt's columns before its last token are run once and, where the
        MLP output is residual, the layer's output is read once (``batch.z``, used by :meth:`_step`).
        Made before the training patch is installed."""
        if not (self.reuse_inputs and self.layer == self.default_layer(-1)):
            return FrozenPrefix(self.lm, [request.prompt], [request.target_new], 0)
        above = self.layer if mlp_output_is_residual(self.lm, self.layer) else None
        return FrozenPrefix(self.lm, [request.prompt], [request.target_new], len(self.lm.prompt_ids(request.prompt)) - 1,
                            above=above)

    def _step(self, wrapper: PatchedMLP, batch: FrozenPrefix, x_e: Tensor, patch: Patch) -> tuple[Tensor, Tensor]:
        """A training step's target NLL and x_e. With ``batch.z`` (the last layer's output without this
        patch, at the n_t + 1 columns after the prompt's frozen ones) the patch's output at the n_t
        positions that predict the target is added to it and only the norm and head run; otherwise a
        forward pass with the patch installed."""
        if batch.z is None:
            return self._edit_forward(wrapper, batch)
        out = torch.relu(x_e @ patch.key.T + patch.bias) @ patch.value  # (n_t, H)
        add = torch.cat([out, out.new_zeros(1, out.shape[1])])[None]  # the last column predicts no target token
        logp, _, _, mask = self.lm.gold_logprobs(batch.logits(add=add), batch.t_ids)
        return -(logp * mask).sum() / mask.sum(), x_e

    def _edit_forward(self, wrapper: PatchedMLP, batch: FrozenPrefix) -> tuple[Tensor, Tensor]:
        """Target NLL and the MLP inputs (n_t, d_in) at the positions that predict the target tokens."""
        wrapper.capture = True
        try:
            logp, _, _, mask = batch.logprobs()
            x = wrapper.captured[0]  # (T, d_in), T: the columns after the frozen ones
        finally:
            wrapper.capture, wrapper.captured = False, None
        n_t, T = int(mask.sum().item()), x.shape[0]
        nll = -(logp * mask).sum() / mask.sum()
        return nll, x[T - n_t - 1:T - 1]  # position j predicts target token j + 1 - (T - n_t)

    def _train_patch(self, wrapper: PatchedMLP, request: EditRequest) -> Patch:
        cfg = self.config
        memory = self._memory_inputs(wrapper, request.prompt)  # (M, d_in)
        batch = self._edit_batch(request)
        with torch.no_grad():
            _, x_e = self._edit_forward(wrapper, batch)  # (n_t, d_in)
        anchors = x_e if cfg.neurons == "per_target_token" else x_e[:1]  # (n, d_in); [:1]: the prompt's last token
        n = anchors.shape[0]
        patch = Patch(key=(anchors / anchors.pow(2).sum(-1, keepdim=True)).clone().requires_grad_(True),  # a_e = 1
                      bias=anchors.new_zeros(n).requires_grad_(True),
                      value=anchors.new_zeros(n, self.lm.hidden_size).requires_grad_(True))
        wrapper.training_patch = patch
        opt = torch.optim.Adam([patch.key, patch.bias, patch.value], lr=cfg.lr)
        try:
            for step in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                nll, x_e = self._step(wrapper, batch, x_e, patch)
                a_e, a_m = self._activations(patch, x_e, memory)
                if self._done(nll, a_e, a_m):
                    break
                loss = nll + cfg.act_weight * torch.exp(cfg.act_margin - a_e).mean()  # l_e + a·l_a
                if a_m.numel():
                    l_m1 = _topk_mean(torch.exp(a_m - cfg.memory_margin), cfg.memory_topk)
                    l_m2 = _topk_mean(torch.exp(a_m[:, None] - a_e[None, :] + cfg.gap_margin), cfg.memory_topk)
                    loss = loss + cfg.memory_weight * (l_m1 + l_m2)  # + m·l_m
                loss.backward()
                opt.step()
        finally:
            wrapper.training_patch = None
        done = Patch(*(t.detach().clone() for t in (patch.key, patch.bias, patch.value)))
        a_m = memory @ done.key.T + done.bias  # (M, n)
        log.debug("tpatcher: %d neurons, %d steps, nll %.4f", n, step + 1, nll.item())
        if a_m.numel() and a_m.max().item() >= 0:
            log.warning("tpatcher patch for %r still fires on a memory token (max pre-activation %.3f)",
                        request.prompt, a_m.max().item())
        return done

    def _activations(self, patch: Patch, x_e: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-activations that must fire (a_e) and must stay off (a_m), both flat."""
        a = x_e @ patch.key.T + patch.bias  # (n_t, n): neuron j at target position i
        a_m = (memory @ patch.key.T + patch.bias).reshape(-1)  # every neuron on every memory token
        if a.shape[1] == 1:  # the single neuron fires at every target position
            return a[:, 0], a_m
        own = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        return a[own], torch.cat([a_m, a[~own]])  # neuron j on; off at the edit's other target positions

    def _done(self, nll: Tensor, a_e: Tensor, a_m: Tensor) -> bool:
        fires_on_memory = a_m.numel() > 0 and a_m.max().item() >= 0
        return nll.item() < self.config.stop_loss and a_e.min().item() > 0 and not fires_on_memory
