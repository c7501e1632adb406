"""Keys, values and key covariance shared by ROME and MEMIT (Meng et al. 2022a, 2022b).

The MLP output projection of layer l (``spec.mlp_out``, HF ``down_proj``, weight ``W`` of shape
(out, in)) is read as a linear associative memory ``v = W k`` (ROME §3.1):

- key ``k*``: the input of ``W`` at the subject's last token, averaged over the prompt preceded by a few
  short context prefixes (:data:`CONTEXT_PREFIXES`, fixed text instead of ROME's sampled ones, so
  edits are deterministic); :func:`compute_key`.
- value ``v* = W k* + δ``: ``δ`` is added to the output of ``W`` at the subject's last token and optimised
  to make the target likely after every context prefix, with a KL term that keeps the model's view of
  "{subject} is a" unchanged, a weight decay and a norm clamp (ROME eq. 4); :func:`compute_value`.
  Since ``W`` is linear, ``W k*`` is the mean of the unedited outputs over the prefixes, so ``v*`` is
  their mean after adding ``δ``. ``δ`` enters at the fact token only, so under causal attention the
  positions before it do not depend on ``δ``, nor do the layers up to ``l``: per request, those are
  computed once and every optimisation step runs the layers above ``l`` on the later columns, with
  the essence prompt as one more row of the batch (:class:`_ReusedSteps`; same result up to float
  rounding).
- ``C = E[k kᵀ]``: the uncentred second moment of the keys (:mod:`recipe.editors.covariance`, re-exported
  here: :class:`KeyCovariance`, :class:`CovarianceSource`).

Positions: ``fact_token = "subject_last"`` (ROME's default) needs ``EditRequest.subject`` inside the
prompt; ``"last"`` uses the prompt's last token and needs no subject (ROME's ``fact_token: last``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from recipe.editors.covariance import (COVARIANCE_SOURCES, CovarianceSource, KeyCovariance,  # noqa: F401 (re-exported)
                                       RandomTokenSource, WikiTextSource, _StopForward)
from recipe.editors.fast_forward import FrozenPrefix, mlp_output_is_residual
from recipe.errors import RecipeError
from recipe.lm import EditedLM
from recipe.types import EditRequest

log = logging.getLogger(__name__)

FactToken = Literal["subject_last", "last"]
# Context prefixes for k* and v* (ROME §3.1 averages over ~20 short model-generated prefixes; fixed
# text here keeps edits deterministic). The first one is empty: the bare prompt.
CONTEXT_PREFIXES = ("", "The following is a fact. ", "Here is what I know. ", "I read this in a book. ",
                    "According to the encyclopedia, ", "As everyone knows, ", "In the news today: ",
                    "Fact check: ", "It is well known that ", "Note that ")
KL_TEMPLATE = "{} is a"  # ROME's essence-drift prompt


# ---- positions -------------------------------------------------------------------------------
# A letter or digit that continues a word: "Rome" does not occur in "Romeo". Kana and CJK ideographs
# are written without spaces, so next to them a subject still counts as a word of its own.
_WORD_CHAR = r"[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"


def find_subject(text: str, subject: str, start: int = 0) -> int:
    """Index of the first occurrence of ``subject`` in ``text[start:]`` as a whole word (not inside a
    longer word), or -1."""
    before = f"(?<!{_WORD_CHAR})" if re.match(_WORD_CHAR, subject) else ""
    after = f"(?!{_WORD_CHAR})" if re.match(_WORD_CHAR, subject[-1:]) else ""
    found = re.compile(before + re.escape(subject) + after).search(text, start)
    return -1 if found is None else found.start()


def fact_index(lm: EditedLM, text: str, subject: str | None, fact_token: FactToken = "subject_last",
               search_from: int = 0) -> int:
    """Index in ``lm.prompt_ids(text)`` of the token that holds the fact: the last token of ``subject``
    (searched in ``text[search_from:]``) or, for ``fact_token="last"``, the last token of ``text``."""
    ids = lm.prompt_ids(text)
    if fact_token == "last":
        return len(ids) - 1
    if subject is None:
        raise RecipeError(f"fact_token 'subject_last' needs EditRequest.subject; the request for {text!r} has none")
    start = find_subject(text, subject, search_from)
    if start < 0:
        raise RecipeError(f"subject {subject!r} does not occur as a word in prompt {text[search_from:]!r}")
    formatted = lm.format_prompt(text)
    end = formatted.find(text) + start + len(subject)  # char just after the subject
    enc = lm.tokenizer(formatted, add_special_tokens=not lm.spec.chat_template, return_offsets_mapping=True)
    if list(enc.input_ids) != ids:
        raise RecipeError(f"tokenizer offsets disagree with prompt_ids for {text!r}")
    hits = [i for i, (s, e) in enumerate(enc.offset_mapping) if e > s and s < end]
    return hits[-1]


def check_request(lm: EditedLM, request: EditRequest, prefixes: Sequence[str], fact_token: FactToken) -> None:
    """Raise a clear error unless ``request`` can be edited: its fact token found after every context
    prefix and in the essence prompt, and the longest prefixed prompt + target within the context."""
    texts, _ = _texts_and_indices(lm, request, prefixes, fact_token)
    if fact_token == "subject_last":
        fact_index(lm, KL_TEMPLATE.format(request.subject), request.subject, fact_token)
    n_tokens = max(len(lm.prompt_ids(t)) for t in texts) + len(lm.target_ids(request.target_new))
    if n_tokens > lm.max_length:
        raise RecipeError(f"prompt + target of {n_tokens} tokens (with a context prefix) do not fit the model's "
                          f"context of {lm.max_length}: {request.prompt[:60]!r}")


def _texts_and_indices(lm: EditedLM, request: EditRequest, prefixes: Sequence[str],
                       fact_token: FactToken) -> tuple[list[str], list[int]]:
    texts = [p + request.prompt for p in prefixes]
    idxs = [fact_index(lm, t, request.subject, fact_token, search_from=len(p)) for t, p in zip(texts, prefixes)]
    return texts, idxs


# ---- reading activations ---------------------------------------------------------------------
def _first(x):
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def post_mlp_norm(lm: EditedLM, layer: int) -> torch.nn.Module | None:
    """The norm decoder ``layer`` applies to its MLP output before adding it to the residual stream
    (Gemma-3's ``post_feedforward_layernorm``: the model config's ``mlp_post_norm``); None where the
    output is added unchanged (Llama, GPT-2, GPT-J, GPT-NeoX)."""
    return lm.module(lm.spec.mlp_post_norm.format(layer)) if lm.spec.mlp_post_norm else None


def through_norm(norm: torch.nn.Module, m: Tensor, delta: Tensor) -> Tensor:
    """How far the residual stream moves when ``delta`` is added to the normed MLP output ``m``: (n, H)."""
    with torch.no_grad():
        return (norm(m + delta) - norm(m)).to(delta.dtype)


def before_norm(norm: torch.nn.Module, m: Tensor, r: Tensor, rtol: float = 1.0e-4) -> Tensor:
    """A change of the normed MLP output ``m`` (n, H) that moves the residual stream by ``r`` (n, H): to first
    order, the least-norm solution of J Δm = r, J the norm's Jacobian at m (an RMSNorm ignores the scale of
    m, so J is singular along m and Δm is orthogonal to it)."""
    out = []
    for m_i, r_i in zip(m, r):
        jac = torch.autograd.functional.jacobian(lambda x: norm(x[None])[0], m_i.detach())  # (H, H)
        out.append(torch.linalg.pinv(jac.double(), rtol=rtol) @ r_i.double())
    return torch.stack(out).to(r.dtype)


def capture(lm: EditedLM, module_path: str, texts: Sequence[str], idxs: Sequence[int],
            what: Literal["input", "output"] = "input") -> Tensor:
    """The input (or output) of module ``module_path`` at token ``idxs[i]`` of ``texts[i]``: (n, d).

    Texts are left-padded as in :meth:`EditedLM.embed`; the forward stops at the module.
    """
    embeds, mask, pos = lm.embed(list(texts), prefixes=None)  # (B, T, H)
    T = embeds.shape[1]
    rows = torch.arange(len(texts), device=lm.device)
    cols = torch.tensor([T - len(lm.prompt_ids(t)) + i for t, i in zip(texts, idxs)], device=lm.device)
    got: dict[str, Tensor] = {}

    def hook(module, args, output=None):
        got["x"] = _first(args if what == "input" else output)[rows, cols]  # (n, d)
        raise _StopForward

    module = lm.module(module_path)
    handle = module.register_forward_pre_hook(hook) if what == "input" else module.register_forward_hook(hook)
    try:
        lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return got["x"]


def compute_key(lm: EditedLM, request: EditRequest, layer: int, context_prefixes: Sequence[str] = CONTEXT_PREFIXES[:5],
                fact_token: FactToken = "subject_last") -> Tensor:
    """k*: the ``mlp_out`` input at the fact token, averaged over the context prefixes (ROME §3.1): (d_in,)."""
    texts, idxs = _texts_and_indices(lm, request, context_prefixes, fact_token)
    return capture(lm, lm.spec.mlp_out.format(layer), texts, idxs).mean(0)


# ---- values ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueOptions:
    """Settings of the v* optimisation (ROME §3.1, eq. 4); the defaults live in ``rome.RankOneConfig``."""

    steps: int  # Adam steps
    lr: float  # Adam learning rate on δ
    kl_factor: float  # weight of KL(base ‖ edited) on "{subject} is a"
    weight_decay: float  # weight of ‖δ‖² / ‖m‖²
    clamp_norm_factor: float  # ‖δ‖ ≤ clamp_norm_factor · ‖m‖ (m: unedited output at the fact token)
    stop_loss: float  # stop once the mean target NLL is below this


@dataclass(frozen=True)
class Value:
    delta: Tensor  # δ (d_out,): change of the mlp_out output at the fact token
    value: Tensor  # v* = W k* + δ (d_out,)
    nll: float  # mean target NLL per token at the end


class _AddAt:
    """Forward hook adding ``delta`` to a module's output at one position per row."""

    def __init__(self, delta: Tensor):
        self.delta, self.onehot = delta, None  # onehot: (B, T, 1)

    def __call__(self, module, args, output):
        return output + self.onehot * self.delta


def _onehot(lm: EditedLM, lengths: Sequence[int], idxs: Sequence[int]) -> Tensor:
    T = max(lengths)
    onehot = torch.zeros(len(lengths), T, 1, device=lm.device)
    for r, (n, i) in enumerate(zip(lengths, idxs)):
        onehot[r, T - n + i] = 1.0  # left padding: token i of a row of n tokens sits at T - n + i
    return onehot


def _kl_logprobs(lm: EditedLM, texts: Sequence[str]) -> Tensor:
    embeds, mask, pos = lm.embed(list(texts), prefixes=None)
    logits = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False,
                      logits_to_keep=1).logits[:, -1].float()  # (B, V): next token after "{subject} is a"
    return torch.log_softmax(logits, -1)


class _FullSteps:
    """The reference objective: every step runs the whole batch with ``δ`` added by a hook at the fact
    tokens, and the essence prompt in a second pass."""

    def __init__(self, lm: EditedLM, module: torch.nn.Module, texts: list[str], idxs: list[int], target: str,
                 kl: tuple[str, int] | None, delta: Tensor):
        self.lm, self.texts, self.targets, self.kl = lm, texts, [target] * len(texts), kl
        n_target = len(lm.target_ids(target))
        self.rewrite_onehot = _onehot(lm, [len(lm.prompt_ids(t)) + n_target for t in texts], idxs)
        if kl is not None:
            self.kl_onehot = _onehot(lm, [len(lm.prompt_ids(kl[0]))], [kl[1]])
        self.adder = _AddAt(delta)
        self.handle = module.register_forward_hook(self.adder)

    def __call__(self) -> tuple[Tensor, Tensor, Tensor | None]:
        self.adder.onehot = self.rewrite_onehot
        logp, _, _, mask = self.lm.target_logprobs(self.texts, self.targets, prefixes=None)  # (B, L)
        kl_logp = None
        if self.kl is not None:
            self.adder.onehot = self.kl_onehot
            kl_logp = _kl_logprobs(self.lm, [self.kl[0]])
        return logp, mask, kl_logp

    def close(self) -> None:
        self.handle.remove()


class _ReusedSteps:
    """The same objective from inputs computed once per request (same values up to float rounding).

    The essence prompt joins the batch as one more row (with the target after it; its logits where the
    target starts are the next-token distribution after "{subject} is a"). Columns before the first
    fact token are frozen (:class:`recipe.editors.fast_forward.FrozenPrefix`), and where the MLP output is added to the
    residual stream unchanged (:func:`~recipe.editors.fast_forward.mlp_output_is_residual`) each step runs only the layers
    above ``layer`` on that layer's output plus ``δ`` at the fact tokens; otherwise a hook adds ``δ``.
    """

    def __init__(self, lm: EditedLM, module: torch.nn.Module, texts: list[str], idxs: list[int], target: str,
                 kl: tuple[str, int] | None, delta: Tensor, layer: int):
        self.lm, self.n, self.delta = lm, len(texts), delta
        rows, row_idxs = texts + ([kl[0]] if kl else []), idxs + ([kl[1]] if kl else [])
        n_target = len(lm.target_ids(target))
        onehot = _onehot(lm, [len(lm.prompt_ids(t)) + n_target for t in rows], row_idxs)  # (B, T, 1)
        split = int(onehot[..., 0].argmax(1).min())  # earliest column where δ enters
        above = layer if mlp_output_is_residual(lm, layer) else None
        self.batch = FrozenPrefix(lm, rows, [target] * len(rows), split, above=above)
        self.onehot = onehot[:, self.batch.split:]  # (B, T - split, 1)
        self.handle = None
        if above is None:
            adder = _AddAt(delta)
            adder.onehot = self.onehot
            self.handle = module.register_forward_hook(adder)

    def __call__(self) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.handle is None:
            logits = self.batch.logits(add=self.onehot * self.delta)  # (B, L, V)
        else:
            logits = self.batch.logits()
        logp, _, _, mask = self.lm.gold_logprobs(logits[:self.n], self.batch.t_ids[:self.n])
        kl_logp = torch.log_softmax(logits[self.n:, 0].float(), -1) if logits.shape[0] > self.n else None
        return logp, mask, kl_logp

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def compute_value(lm: EditedLM, request: EditRequest, layer: int, key: Tensor,
                  context_prefixes: Sequence[str], options: ValueOptions,
                  fact_token: FactToken = "subject_last", reuse_prefix: bool = True) -> Value:
    """v* for ``request`` at ``layer`` (ROME §3.1, eq. 4):

    ``δ = argmin  mean_j −log P[target | x_j + prompt, m += δ]  +  kl_factor · KL(P[· | s is a] ‖ P'[· | s is a])
    + weight_decay · ‖δ‖²/‖m‖²``, with ``‖δ‖ ≤ clamp_norm_factor · ‖m‖`` after every step, and
    ``v* = W k* + δ``. Without a subject (``fact_token="last"``) there is no essence prompt and no KL term.
    ``reuse_prefix``: compute what does not change between steps once (:class:`_ReusedSteps`); False:
    full forwards at every step (:class:`_FullSteps`, the reference for tests).
    """
    module = lm.module(lm.spec.mlp_out.format(layer))
    weight = module.weight
    texts, idxs = _texts_and_indices(lm, request, context_prefixes, fact_token)
    kl = None
    if request.subject is not None and options.kl_factor > 0:
        kl_text = KL_TEMPLATE.format(request.subject)
        kl = (kl_text, fact_index(lm, kl_text, request.subject, fact_token))
        with torch.no_grad():
            base_kl_logp = _kl_logprobs(lm, [kl_text])  # (1, V)
    m = capture(lm, lm.spec.mlp_out.format(layer), texts[:1], idxs[:1], what="output")[0]  # unedited output (d_out,)
    max_norm = options.clamp_norm_factor * m.norm()
    delta = torch.zeros_like(m, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=options.lr)
    if reuse_prefix:
        objective = _ReusedSteps(lm, module, texts, idxs, request.target_new, kl, delta, layer)
    else:
        objective = _FullSteps(lm, module, texts, idxs, request.target_new, kl, delta)
    try:
        for step in range(options.steps):
            opt.zero_grad(set_to_none=True)
            logp, mask, kl_logp = objective()  # (B, L), (B, L), (1, V) or None
            nll = -(logp * mask).sum() / mask.sum()
            loss = nll + options.weight_decay * delta.norm() ** 2 / m.norm() ** 2
            if kl_logp is not None:
                kl_term = F.kl_div(kl_logp, base_kl_logp, log_target=True, reduction="batchmean")
                loss = loss + options.kl_factor * kl_term
            if nll.item() < options.stop_loss:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        objective.close()
    log.debug("v* for %r: %d steps, nll %.4f, |δ| %.3f, |m| %.3f", request.prompt, step + 1, nll.item(),
              delta.norm().item(), m.norm().item())
    delta = delta.detach()
    return Value(delta=delta, value=weight @ key + delta, nll=nll.item())
