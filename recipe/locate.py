"""Causal tracing (ROME §2, Meng et al. 2022): which hidden states carry a fact to the prediction?

Three runs over one prompt:

- clean: the model as is; ``p_clean`` = P[target's first token | prompt];
- corrupted: Gaussian noise ``ν · σ · N(0, I)`` added to the embeddings of the subject's tokens
  (``ν = noise_factor = 3``; ``σ`` is the standard deviation of the token embedding matrix, ROME takes
  it over subject embeddings), ``n_samples`` seeded draws; ``p_corrupt`` = their mean probability;
- corrupted-with-restoration: as corrupted, but one state (kind, layer, token) is set back to its
  clean value; kinds are the residual stream (output of decoder layer l), the MLP output
  (``spec.mlp_out``) and the attention output (``<layers>.l.<attn_module>``).

The indirect effect of a state is ``p_restored − p_corrupt`` (ROME §2.1). :func:`trace` returns
every restored probability as (layers, tokens) arrays; :func:`plot_trace` draws ROME Fig. 1-style
heatmaps. Each (kind, layer) costs one forward over tokens × samples rows. :func:`layer_effects` is the
cheap aggregate over many facts (ROME Fig. 2's average indirect effect): one token per fact (by
default the subject's last), so each (kind, layer) costs one forward over samples rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from recipe.errors import RecipeError
from recipe.lm import EditedLM

Kind = Literal["residual", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("residual", "mlp", "attn")
Token = Literal["subject_last", "subject_first", "last"]  # which token layer_effects restores
log = logging.getLogger(__name__)


@dataclass
class TraceResult:
    """Restored probabilities of one prompt: ``scores[kind]`` is (layers, tokens)."""

    prompt: str
    subject: str
    target: str  # the token whose probability is traced
    tokens: list[str]
    subject_tokens: tuple[int, int]  # [first, last] token index of the subject
    p_clean: float
    p_corrupt: float
    scores: dict[str, np.ndarray]

    def indirect_effect(self, kind: Kind) -> np.ndarray:
        """``p_restored − p_corrupt`` per (layer, token) (ROME §2.1)."""
        return self.scores[kind] - self.p_corrupt

    def best_layer(self, kind: Kind = "mlp") -> int:
        """The layer whose state at the subject's last token has the largest indirect effect."""
        return int(np.argmax(self.indirect_effect(kind)[:, self.subject_tokens[1]]))


def subject_span(lm: EditedLM, prompt: str, subject: str) -> tuple[int, int]:
    """[first, last] index in ``lm.prompt_ids(prompt)`` of the tokens that overlap ``subject``."""
    from recipe.editors.rank_one import find_subject

    start = find_subject(prompt, subject)
    if start < 0:
        raise RecipeError(f"subject {subject!r} does not occur as a word in prompt {prompt!r}")
    formatted = lm.format_prompt(prompt)
    begin = formatted.find(prompt) + start
    end = begin + len(subject)
    enc = lm.tokenizer(formatted, add_special_tokens=not lm.spec.chat_template, return_offsets_mapping=True)
    hits = [i for i, (s, e) in enumerate(enc.offset_mapping) if e > s and s < end and e > begin]
    return hits[0], hits[-1]


@torch.no_grad()
def embedding_std(lm: EditedLM, chunk: int = 8192) -> float:
    """Standard deviation of the input embedding *module's output* over the whole vocabulary: the σ of
    the noise. Not ``weight.std()``: Gemma's embedding multiplies its rows by √hidden (≈ 25 for 640)."""
    embed = lm.model.get_input_embeddings()
    total = total_sq = 0.0
    n = 0
    for start in range(0, embed.weight.shape[0], chunk):
        ids = torch.arange(start, min(start + chunk, embed.weight.shape[0]), device=lm.device)
        x = embed(ids).double()  # (chunk, H)
        total, total_sq, n = total + x.sum().item(), total_sq + (x * x).sum().item(), n + x.numel()
    mean = total / n
    return ((total_sq - n * mean * mean) / (n - 1)) ** 0.5


def _window(layer: int, w: int, n_layers: int) -> range:
    """ROME's window: ``w`` layers centred on ``layer``, clipped to the model."""
    return range(max(0, layer - w // 2), min(n_layers, layer - (-w // 2)))


class _Tracer:
    """The clean states and the noisy embeddings of one prompt, and patched forward passes."""

    def __init__(self, lm: EditedLM, prompt: str, subject: str, target: str | None, n_samples: int,
                 noise_factor: float, seed: int, attn_module: str, sigma: float | None = None):
        self.lm, self.attn_module = lm, attn_module
        self.ids = torch.tensor(lm.prompt_ids(prompt), device=lm.device)  # (T,)
        self.span = subject_span(lm, prompt, subject)
        self.n_layers = lm.model.config.num_hidden_layers
        embed = lm.model.get_input_embeddings()
        self.embeds = embed(self.ids)  # (T, H)
        gen = torch.Generator().manual_seed(seed)
        first, last = self.span
        noise = torch.randn(n_samples, last - first + 1, self.embeds.shape[1], generator=gen)
        sigma = embedding_std(lm) if sigma is None else sigma
        self.noise = (noise_factor * sigma * noise.to(self.embeds)).detach()  # (S, n_subj, H)
        self.clean = self._clean_states()
        self.target_id = int(self.clean_logits.argmax()) if target is None else lm.target_ids(target)[0]
        self.p_clean = torch.softmax(self.clean_logits.float(), -1)[self.target_id].item()

    def token_index(self, token: Token) -> int:
        if token == "subject_last":
            return self.span[1]
        if token == "subject_first":
            return self.span[0]
        if token == "last":
            return len(self.ids) - 1
        raise RecipeError(f"unknown token {token!r}; known: subject_last, subject_first, last")

    def path(self, kind: Kind, layer: int) -> str:
        if kind == "residual":
            return f"{self.lm.spec.layers}.{layer}"
        if kind == "mlp":
            return self.lm.spec.mlp_out.format(layer)
        if kind == "attn":
            return f"{self.lm.spec.layers}.{layer}.{self.attn_module}"
        raise RecipeError(f"unknown state kind {kind!r}; known: {KINDS}")

    @torch.no_grad()
    def _clean_states(self) -> dict[str, Tensor]:
        states, handles = {}, []
        for kind in KINDS:
            for layer in range(self.n_layers):
                path = self.path(kind, layer)
                hook = lambda m, a, out, path=path: states.__setitem__(path, _first(out)[0])  # (T, H)
                handles.append(self.lm.module(path).register_forward_hook(hook))
        try:
            self.clean_logits = self.lm.model(inputs_embeds=self.embeds[None], use_cache=False).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        return states

    def noisy_embeds(self, repeats: int) -> Tensor:
        """Corrupted embeddings: (repeats · S, T, H), sample s of every repeat gets noise draw s."""
        S = self.noise.shape[0]
        x = self.embeds[None].repeat(repeats * S, 1, 1)
        x[:, self.span[0]:self.span[1] + 1] += self.noise.repeat(repeats, 1, 1)
        return x

    @torch.no_grad()
    def probs(self, patches: Sequence[Sequence[tuple[str, int]]]) -> Tensor:
        """Mean target probability over noise samples for each group of (module path, token) restorations: (G,)."""
        S = self.noise.shape[0]
        by_path: dict[str, list[tuple[int, int]]] = {}
        for g, group in enumerate(patches):
            for path, token in group:
                by_path.setdefault(path, []).extend((g * S + s, token) for s in range(S))
        handles = [self.lm.module(p).register_forward_hook(self._restore(p, rows)) for p, rows in by_path.items()]
        try:
            logits = self.lm.model(inputs_embeds=self.noisy_embeds(len(patches)), use_cache=False,
                                   logits_to_keep=1).logits[:, -1].float()  # (G · S, V)
        finally:
            for h in handles:
                h.remove()
        return torch.softmax(logits, -1)[:, self.target_id].view(len(patches), S).mean(1)

    def _restore(self, path: str, rows: list[tuple[int, int]]):
        r = torch.tensor([row for row, _ in rows], device=self.lm.device)
        t = torch.tensor([tok for _, tok in rows], device=self.lm.device)

        def hook(module, args, output):
            hidden = _first(output).clone()
            hidden[r, t] = self.clean[path][t]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def trace(lm: EditedLM, prompt: str, subject: str, target: str | None = None, *, n_samples: int = 5,
          noise_factor: float = 3.0, seed: int = 0, kinds: Sequence[Kind] = KINDS, window: int = 1,
          attn_module: str = "self_attn") -> TraceResult:
    """Causal trace of ``prompt``: restored probability of ``target``'s first token (default: the clean
    argmax) for every (kind, layer, token) (ROME §2). Residual states are restored one at a time; MLP and
    attention outputs over ``window`` layers centred on the layer (ROME's figures use 10), since one
    layer's MLP alone moves little."""
    tracer = _Tracer(lm, prompt, subject, target, n_samples, noise_factor, seed, attn_module)
    T, L = len(tracer.ids), tracer.n_layers
    p_corrupt = tracer.probs([[]]).item()
    scores = {}
    for kind in kinds:
        w = 1 if kind == "residual" else window
        rows = [tracer.probs([[(tracer.path(kind, j), t) for j in _window(layer, w, L)] for t in range(T)])
                for layer in range(L)]
        scores[kind] = torch.stack(rows).cpu().numpy()  # (L, T)
    tokens = [lm.tokenizer.decode([i]) for i in tracer.ids.tolist()]
    return TraceResult(prompt, subject, lm.tokenizer.decode([tracer.target_id]), tokens, tracer.span,
                       tracer.p_clean, p_corrupt, scores)


@dataclass
class LayerEffects:
    """Indirect effects of restoring one state at one token per fact (ROME Fig. 2's average indirect
    effect): ``effects[kind]`` is (facts, layers) of ``p_restored − p_corrupt``."""

    facts: list[tuple[str, str, str | None]]  # (prompt, subject, target)
    token: str  # which token was restored: subject_last, subject_first or last
    window: int  # MLP/attention layers restored together, centred on the layer
    n_samples: int
    p_clean: np.ndarray  # (F,)
    p_corrupt: np.ndarray  # (F,)
    effects: dict[str, np.ndarray]

    def average(self, kind: Kind) -> np.ndarray:
        """Average indirect effect per layer over the facts: (L,)."""
        return self.effects[kind].mean(0)

    def best_layer(self, kind: Kind = "mlp") -> int:
        """The layer with the largest average indirect effect."""
        return int(np.argmax(self.average(kind)))


def layer_effects(lm: EditedLM, facts: Sequence[tuple[str, str, str | None]], *, n_samples: int = 10,
                  noise_factor: float = 3.0, seed: int = 0, token: Token = "subject_last",
                  kinds: Sequence[Kind] = KINDS, window: int = 1, attn_module: str = "self_attn") -> LayerEffects:
    """For every fact (prompt, subject, target or None for the clean argmax) and every (kind, layer),
    the indirect effect of restoring that state at ``token`` alone (MLP/attention: over ``window``
    layers centred on it, as :func:`trace`). Equals ``trace(...).indirect_effect(kind)[:, token]`` per
    fact with the same seed, at 1/tokens of the cost: one forward of layers × samples rows per kind."""
    if not facts:
        raise RecipeError("layer_effects needs at least one fact")
    sigma = embedding_std(lm)
    p_clean, p_corrupt, effects = [], [], {kind: [] for kind in kinds}
    for i, (prompt, subject, target) in enumerate(facts):
        tracer = _Tracer(lm, prompt, subject, target, n_samples, noise_factor, seed, attn_module, sigma)
        t, L = tracer.token_index(token), tracer.n_layers
        p_clean.append(tracer.p_clean)
        p_corrupt.append(tracer.probs([[]]).item())
        for kind in kinds:
            w = 1 if kind == "residual" else window
            groups = [[(tracer.path(kind, j), t) for j in _window(layer, w, L)] for layer in range(L)]
            effects[kind].append(tracer.probs(groups).cpu().numpy() - p_corrupt[-1])  # (L,)
        log.info("fact %d/%d: p_clean %.3f, p_corrupt %.3f", i + 1, len(facts), p_clean[-1], p_corrupt[-1])
    return LayerEffects([tuple(f) for f in facts], token, window, n_samples, np.array(p_clean), np.array(p_corrupt),
                        {kind: np.stack(rows) for kind, rows in effects.items()})


def restored_probability(lm: EditedLM, prompt: str, subject: str, target: str | None,
                         restore: Sequence[tuple[Kind, int, int]], *, n_samples: int = 5, noise_factor: float = 3.0,
                         seed: int = 0, attn_module: str = "self_attn") -> float:
    """Mean target probability of the corrupted run with every (kind, layer, token) in ``restore`` set
    back to its clean value at once (same noise as :func:`trace` with the same seed); an empty
    ``restore`` gives ``p_corrupt``."""
    tracer = _Tracer(lm, prompt, subject, target, n_samples, noise_factor, seed, attn_module)
    return tracer.probs([[(tracer.path(k, layer), t) for k, layer, t in restore]]).item()


def plot_trace(result: TraceResult, path: str | Path) -> Path:
    """Write ROME Fig. 1-style heatmaps (tokens × layers, one panel per kind) of ``result`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result.scores)
    labels = [t + ("*" if result.subject_tokens[0] <= i <= result.subject_tokens[1] else "")
              for i, t in enumerate(result.tokens)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 0.35 * len(labels) + 1.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        im = ax.pcolormesh(result.scores[kind].T, cmap={"residual": "Purples", "mlp": "Greens", "attn": "Reds"}[kind],
                           vmin=result.p_corrupt)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(labels)) + 0.5, labels)
        ax.set_xlabel("layer")
        ax.set_title(f"restoring {kind} (p clean {result.p_clean:.3f}, corrupt {result.p_corrupt:.3f})", fontsize=8)
        fig.colorbar(im, ax=ax, label=f"p({result.target.strip()})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
