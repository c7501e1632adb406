"""GRACE: a codebook of (key, value, radius) at one layer (Hartvigsen et al. 2023, "Aging with GRACE:
Lifelong Model Editing with Discrete Key-Value Adaptors").

The MLP output projection of one layer (``spec.mlp_out``, e.g. ``down_proj``) is swapped for a
:class:`GraceCodebook` that holds the original module. At every position the codebook compares the
projection's input ``x`` (d_in) with its keys; if the nearest key ``k_c`` lies within its radius,
``‖x − k_c‖ ≤ ε_c``, the projection's output there is *replaced* by that entry's value ``v_c``
(d_out); otherwise the output is the original one, bit-exactly. Weights are never changed.

Editing one request (GRACE Alg. 1):

- the key ``h`` is the input at the prompt's last token (the position that predicts the first target
  token), computed from the prompt alone, so queries never see answer tokens;
- no entry within ``ε_c + eps_init``: a new entry ``(h, v, eps_init, label)``;
- the nearest entry has the same label (the target text): its radius grows to cover ``h``,
  ``ε_c ← max(ε_c, d + eps_init / 2)``, and its value is trained further on the new prompt;
- a different label (conflict): both radii become ``d / 2`` (split), and a new entry is added;
  if ``h`` is the entry's key itself (the same prompt edited again), the newer answer replaces it.

A new value starts at the original output at ``h`` (so it changes nothing yet) and is trained with
Adam on the target's teacher-forced NLL, with the codebook applied as at inference, until the NLL
is below ``stop_loss`` or ``steps`` run out. Only one position per prompt is replaced, so tokens
after the first reach the edit through attention; GRACE's paraphrase generality is as good as the
keys' geometry (a paraphrase must land within the radius), and its locality as good as the radii
keep unrelated inputs out.

Speed (same values up to float rounding): training changes one entry's value, which enters the
residual stream only at the positions that hit that entry. The layer's output is read once per edit
and each step adds ``hit · (v − v₀)`` to it and runs the layers above (:func:`~recipe.editors.fast_forward.forward_above`),
where the MLP output enters the residual stream unchanged (:func:`~recipe.editors.fast_forward.mlp_output_is_residual`,
as in Llama); otherwise full forwards.

``rollback`` puts the original module back. Entries can be shared by several edits (expansion) and
splits shrink neighbours' radii, so single edits cannot be undone exactly: ``remove`` is refused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn

from recipe.editors.base import Editor, EditorConfig, check_tensor, register_editor
from recipe.editors.fast_forward import FrozenPrefix, mlp_output_is_residual
from recipe.errors import IncompatibleError, RecipeError
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)
SAME_KEY = 1.0e-5  # relative distance under which two keys count as the same input


@dataclass
class GraceConfig(EditorConfig):
    layer: int | None = None  # layer whose MLP output projection holds the codebook; None: edit_layers.grace
    eps_init: float = 8.0  # radius of a new entry (SmolLM2 layer 24: a zsRE paraphrase lies ~6-8 from its key)
    steps: int = 100  # most Adam steps per value
    lr: float = 0.5  # Adam learning rate on the value
    stop_loss: float = 5.0e-2  # stop once the target's mean NLL is below this
    counts: ClassVar[tuple[str, ...]] = ("steps",)


class GraceCodebook(nn.Module):
    """``out = v_c`` where the nearest key is within its radius, else the original projection's output."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj  # the original module object, put back on rollback
        ref = proj.weight.detach()
        self.keys = ref.new_zeros(0, proj.in_features)  # (n, d_in)
        self.values = ref.new_zeros(0, proj.out_features)  # (n, d_out)
        self.radii = ref.new_zeros(0)  # (n,)
        self.labels: list[str] = []
        self.owners: list[list[EditId]] = []  # edit ids each entry serves
        self.training_value: tuple[int, Tensor] | None = None  # (entry, value in training)
        self.capture = False  # keep the last input in ``captured``
        self.captured: Tensor | None = None

    def add(self, key: Tensor, value: Tensor, radius: float, label: str, edit_id: EditId) -> int:
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value[None]])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.labels.append(label)
        self.owners.append([edit_id])
        return len(self.labels) - 1

    def nearest(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Distance to and index of the nearest key for each row of ``x`` (N, d_in)."""
        d = torch.cdist(x.float(), self.keys.float(), compute_mode="donot_use_mm_for_euclid_dist")  # (N, n)
        return d.min(-1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.proj(x)  # (B, T, d_out)
        if self.capture:
            self.captured = x
        if not self.labels:
            return out
        values = self.values
        if self.training_value is not None:
            c, v = self.training_value
            values = values.index_put((torch.tensor([c], device=v.device),), v[None])  # differentiable in v
        dist, idx = self.nearest(x.reshape(-1, x.shape[-1]))  # (B·T,)
        hit = (dist <= self.radii[idx]).view(*x.shape[:-1], 1)  # (B, T, 1)
        return torch.where(hit, values[idx].view(*out.shape).to(out.dtype), out)


@register_editor
class GraceEditor(Editor):
    name = "grace"
    config_cls = GraceConfig
    reuse_inputs = True  # False: a full forward at every training step (tests' reference)

    def __init__(self, lm, config: GraceConfig | None = None):
        super().__init__(lm, config)
        cfg = self.config
        if cfg.steps < 1 or cfg.eps_init <= 0 or cfg.lr <= 0:
            raise RecipeError(f"grace needs steps >= 1, eps_init > 0 and lr > 0, got {cfg.steps}, {cfg.eps_init}, {cfg.lr}")
        self.layer = self.default_layer(cfg.layer)
        self.path = self.lm.spec.mlp_out.format(self.layer)
        proj = self.lm.module(self.path)
        if not isinstance(proj, nn.Linear):
            raise RecipeError(f"grace needs {self.path} to be a Linear layer, got {type(proj).__name__}")
        self.codebook: GraceCodebook | None = None

    # ---- module swap -------------------------------------------------------------------------
    def _install(self) -> GraceCodebook:
        if self.codebook is None:
            self.codebook = GraceCodebook(self.lm.module(self.path))
            self.lm.replace_module(self.path, self.codebook)
        return self.codebook

    def _uninstall(self) -> None:
        if self.codebook is not None:
            self.lm.replace_module(self.path, self.codebook.proj)
            self.codebook = None

    def rollback(self) -> None:
        self._uninstall()
        self._next_id = 0

    def _savepoint(self):
        """Undo for a failed ``edit``: the codebook's entries as they are now (values and radii change in place)."""
        book = self.codebook
        if book is None:
            return self._uninstall
        saved = (book.keys, book.values.clone(), book.radii.clone(), list(book.labels), [list(o) for o in book.owners])

        def restore() -> None:
            book.keys, book.values, book.radii, book.labels, book.owners = saved
            book.training_value, book.capture, book.captured = None, False, None

        return restore

    # ---- the protocol ------------------------------------------------------------------------
    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        book = self._install()
        for request, edit_id in zip(requests, ids):
            self._edit_one(book, request, edit_id)

    def _edit_one(self, book: GraceCodebook, request: EditRequest, edit_id: EditId) -> None:
        eps, label = self.config.eps_init, request.target_new.strip()
        key, out = self._key(book, request.prompt)
        if not book.labels:
            entry = book.add(key, out, eps, label, edit_id)
        else:
            d, c = (t.item() for t in book.nearest(key[None]))
            c = int(c)
            if d > book.radii[c].item() + eps:  # far from every entry: a new one
                entry = book.add(key, out, eps, label, edit_id)
            elif d <= SAME_KEY * max(key.norm().item(), 1.0):  # the same input again: the newer answer wins
                book.labels[c] = label
                book.owners[c].append(edit_id)
                entry = c
            elif book.labels[c] == label:  # the same answer: expand the entry to cover h
                book.radii[c] = max(book.radii[c].item(), d + eps / 2)
                book.owners[c].append(edit_id)
                entry = c
            else:  # another answer: split the space between the two
                book.radii[c] = min(book.radii[c].item(), d / 2)
                entry = book.add(key, out, d / 2, label, edit_id)
        book.values[entry] = self._train_value(book, entry, request)

    @torch.no_grad()
    def _key(self, book: GraceCodebook, prompt: str) -> tuple[Tensor, Tensor]:
        """The projection's input (d_in) and original output (d_out) at the prompt's last token."""
        book.capture = True
        try:
            embeds, mask, pos = self.lm.embed([prompt], prefixes=None)
            self.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                          use_cache=False)
            x = book.captured[0, -1]  # (d_in,)
        finally:
            book.capture, book.captured = False, None
        return x.clone(), book.proj(x[None])[0]

    def _full_logprobs(self, request: EditRequest) -> tuple[Tensor, Tensor]:
        logp, _, _, mask = self.lm.target_logprobs([request.prompt], [request.target_new], prefixes=None)
        return logp, mask

    def _steps(self, book: GraceCodebook, entry: int, request: EditRequest):
        """``value -> (logp, mask)`` for the training loop: an :class:`_UpperSteps` where the layout allows
        it, else full forwards."""
        if self.reuse_inputs and mlp_output_is_residual(self.lm, self.layer):
            return _UpperSteps(self.lm, book, entry, request, self.layer)
        return lambda value: self._full_logprobs(request)

    def _train_value(self, book: GraceCodebook, entry: int, request: EditRequest) -> Tensor:
        value = book.values[entry].detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=self.config.lr)
        book.training_value = (entry, value)
        try:
            steps = self._steps(book, entry, request)
            for step in range(self.config.steps):
                opt.zero_grad(set_to_none=True)
                logp, mask = steps(value)
                nll = -(logp * mask).sum() / mask.sum()
                if nll.item() < self.config.stop_loss:
                    break
                nll.backward()
                opt.step()
        finally:
            book.training_value = None
        log.debug("grace: entry %d, %d steps, nll %.4f", entry, step + 1, nll.item())
        return value.detach()

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        book = self.codebook
        entries = {} if book is None else {"keys": book.keys.cpu().clone(), "values": book.values.cpu().clone(),
                                           "radii": book.radii.cpu().clone(), "labels": list(book.labels),
                                           "owners": [list(o) for o in book.owners]}
        return {**super().state_dict(), "layer": self.layer, "codebook": entries}

    def load_state_dict(self, state: dict) -> None:
        """Replace the current codebook by the saved one, checked in full first (a failure changes nothing)."""
        next_id = self._check_state(state)
        saved = self._checked_codebook(state)
        self.rollback()
        self._next_id = next_id
        if saved is None:
            return
        book = self._install()
        ref = book.proj.weight
        book.keys, book.values, book.radii = (saved[k].to(ref.device, ref.dtype) for k in ("keys", "values", "radii"))
        book.labels, book.owners = list(saved["labels"]), [list(o) for o in saved["owners"]]

    def _checked_codebook(self, state: dict) -> dict | None:
        """The saved codebook (None: empty) if every value fits this editor's layer; else IncompatibleError."""
        if state.get("layer", self.layer) != self.layer:
            raise IncompatibleError(f"state was made for layer {state.get('layer')!r}, this editor edits {self.layer}")
        saved = state.get("codebook") or {}
        labels, owners = saved.get("labels") or [], saved.get("owners") or []
        if not labels:
            return None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or not isinstance(owners, list) \
                or len(owners) != len(labels) or not all(_is_id_list(o) for o in owners):
            raise IncompatibleError("saved codebook: labels must be strings and owners lists of edit ids, one per entry")
        proj = self.codebook.proj if self.codebook is not None else self.lm.module(self.path)
        n = len(labels)
        check_tensor(saved.get("keys"), (n, proj.in_features), "saved codebook keys")
        check_tensor(saved.get("values"), (n, proj.out_features), "saved codebook values")
        if (check_tensor(saved.get("radii"), (n,), "saved codebook radii") < 0).any():
            raise IncompatibleError("saved codebook radii must be non-negative")
        return saved


def _is_id_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


class _UpperSteps:
    """Target log-probs while one codebook value trains, running only the layers above the codebook.

    ``batch.z`` (1, T, H): the output of decoder ``layer`` on prompt + target with the codebook applied
    and the entry's value at ``v0`` (its value when this object is made); ``hit`` (1, T, 1): the
    positions whose nearest key is ``entry`` within its radius (keys and radii do not change while the
    value trains). A step adds ``hit · (v − v0)`` to that output (:meth:`FrozenPrefix.logits`).
    """

    def __init__(self, lm, book: GraceCodebook, entry: int, request: EditRequest, layer: int):
        self.lm = lm
        self.v0 = book.training_value[1].detach().clone()
        book.capture = True
        try:
            self.batch = FrozenPrefix(lm, [request.prompt], [request.target_new], 0, above=layer)
            dist, idx = book.nearest(book.captured[0])  # the codebook's inputs (T, d_in)
        finally:
            book.capture, book.captured = False, None
        self.hit = ((idx == entry) & (dist <= book.radii[idx])).to(self.batch.z.dtype)[None, :, None]  # (1, T, 1)

    def __call__(self, value: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.batch.logits(add=self.hit * (value - self.v0).to(self.batch.z.dtype))
        logp, _, _, mask = self.lm.gold_logprobs(logits, self.batch.t_ids)
        return logp, mask
