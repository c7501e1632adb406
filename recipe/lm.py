"""EditedLM: a Hugging Face causal LM plus optional per-prompt prefixes.

Every input is laid out left-padded as ``[pad ; prefix_i ; prompt_i ; target_i]`` and fed as
``inputs_embeds`` with ``position_ids = cumsum(mask) - 1`` (with left padding and embeddings the
last-token logits drift otherwise). Left padding puts every target at the end of the row, so the
logits that predict target token ``j`` of row ``i`` sit at ``T - len_i + j - 1`` for all rows.

The text ``generate()`` and ``score()`` feed prefixes as cached attention keys/values instead
(``recipe.prefix_cache``): same results, but only the prompts (and targets) are run through the
model, and a prefix retrieved again is not recomputed. ``target_logprobs`` (differentiable, used
in training) keeps the inline layout.

A :class:`Prefix` says WHAT to put before a prompt: learned vectors and/or token ids. The LM does
all embedding (:meth:`EditedLM.prefix_embeddings`), so calls go one way: RECIPE plugs in through
``prefix_provider``, a callable that maps the prompt texts (the question only, never teacher-forced
answer tokens) to one :class:`Prefix` or ``None`` per prompt. With no prefixes the output equals the
base model's own ``generate`` (a test shows it). ``generate(input_ids=..., **kwargs)``, the wrapped
model's own signature, is :mod:`recipe.hf_generate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from recipe.errors import RecipeError
from recipe.prefix_cache import PrefixKVCache, cache_kwargs

AUTO = "auto"


@dataclass(frozen=True, eq=False)
class Prefix:
    """What to put before one prompt: ``vectors`` (l, H), then the LM's embeddings of ``token_ids``.

    Either part may be absent, not both. ``vectors`` may require grad (training, refinement): the
    embedded prefix is differentiable in them.
    """

    vectors: Tensor | None = None  # (l, H) continuous prompt vectors
    token_ids: tuple[int, ...] = ()  # tokens whose embeddings follow the vectors

    def __post_init__(self):
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        if self.vectors is None and not self.token_ids:
            raise RecipeError("an empty prefix: give vectors, token ids or both")
        if self.vectors is not None and (self.vectors.dim() != 2 or self.vectors.shape[0] == 0):
            raise RecipeError(f"prefix vectors of shape {tuple(self.vectors.shape)}; expected (l, H) with l > 0")

    def __len__(self) -> int:
        return (0 if self.vectors is None else self.vectors.shape[0]) + len(self.token_ids)


PrefixProvider = Callable[[Sequence[str]], list["Prefix | None"]]


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced view of one target after one prompt."""

    target_ids: tuple[int, ...]
    predicted_ids: tuple[int, ...]  # argmax at each target position, given the gold prefix
    logprobs: tuple[float, ...]  # log p(target token | prompt, gold prefix)

    @property
    def accuracy(self) -> float:
        """The field's token accuracy: fraction of target tokens whose argmax equals the label."""
        hits = sum(p == t for p, t in zip(self.predicted_ids, self.target_ids))
        return hits / len(self.target_ids)


def _contiguous_head_input(model: nn.Module) -> None:
    """Make the output head's input contiguous before its matmul (a forward pre-hook, added once per model).

    Hugging Face models apply the head to ``hidden[:, -k:]`` (``logits_to_keep``), a strided view when a
    batch has more than k columns. ``torch.matmul`` then runs a batched matmul over a broadcast copy of the
    (vocab, hidden) weight instead of one matrix product, several times slower on CPU (torch 2.13), forward
    and backward alike (benchmarks/REPORT.md §4). The values are the same.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_recipe_contiguous_input", False):
        return

    def hook(module, args):
        if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    head.register_forward_pre_hook(hook)
    head._recipe_contiguous_input = True


class EditedLM(nn.Module):
    """A HF causal LM + tokenizer, with an optional per-prompt prefix of continuous embeddings."""

    def __init__(self, model: nn.Module, tokenizer, spec=None, *, max_batch: int = 16,
                 prefix_cache_mb: float = 256.0):
        super().__init__()
        from recipe.families import adapt, spec_for

        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec if spec is not None else spec_for(model.config, getattr(model, "name_or_path", "model"))
        adapt(model, self.spec)  # GPT-2's Conv1D MLP outputs as Linear views of the same weights
        self.max_batch = max_batch  # rows per forward pass in score()/generate()
        self.prefix_provider: PrefixProvider | None = None
        self.prefix_cache = PrefixKVCache(model, prefix_cache_mb)  # prefix keys/values for generate() and score()
        _contiguous_head_input(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ---- facts -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    # What transformers.pipeline("text-generation", model=lm) reads of a model besides generate().
    config = property(lambda self: self.model.config)
    generation_config = property(lambda self: self.model.generation_config)
    dtype = property(lambda self: self.model.dtype)

    def can_generate(self) -> bool:
        return True

    def module(self, path: str) -> nn.Module:
        """A submodule by dotted path, e.g. ``spec.mlp_out.format(21)``, with a clear error."""
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            from recipe.families import family_of, unknown_architecture_hint

            model_type = getattr(self.model.config, "model_type", "?")
            hint = "" if family_of(model_type) else "; " + unknown_architecture_hint(model_type, self.spec.name)
            raise RecipeError(f"model {self.spec.name!r} has no module {path!r}{hint}") from None

    def replace_module(self, path: str, new: nn.Module) -> nn.Module:
        """Put ``new`` at dotted ``path`` and return the module it replaces (module-swapping editors)."""
        parent_path, _, child = path.rpartition(".")
        parent = self.module(parent_path) if parent_path else self.model
        old = self.module(path)
        setattr(parent, child, new)
        return old

    # ---- tokenisation ------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        if not self.spec.chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecipeError(f"empty prompt: {prompt!r}")
        ids = self.tokenizer(self.format_prompt(prompt), add_special_tokens=not self.spec.chat_template).input_ids
        if len(ids) >= self.max_length:
            raise RecipeError(
                f"prompt of {len(ids)} tokens does not fit the model's context of {self.max_length}: "
                f"{prompt[:60]!r}..."
            )
        return ids

    def target_ids(self, target: str) -> list[int]:
        """Tokens of ``target`` as they follow a prompt: ``spec.target_prefix + target`` (" Essex")."""
        if not isinstance(target, str) or not target.strip():
            raise RecipeError(f"empty target: {target!r}")
        sep = "" if self.spec.chat_template else self.spec.target_prefix
        ids = self.tokenizer(sep + target.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise RecipeError(f"target {target!r} tokenises to nothing")
        return ids

    # ---- layout ------------------------------------------------------------------------------
    def prefix_embeddings(self, prefix: Prefix) -> Tensor:
        """The prefix as the model sees it (l + n, H): its vectors, then its tokens' input embeddings."""
        if not isinstance(prefix, Prefix):
            raise RecipeError(f"a prefix must be a recipe.lm.Prefix or None, not {type(prefix).__name__}")
        vectors = prefix.vectors
        if vectors is not None and vectors.shape[1] != self.hidden_size:
            raise RecipeError(f"prefix vectors of shape {tuple(vectors.shape)}; expected (l, {self.hidden_size})")
        if not prefix.token_ids:
            return vectors
        emb = self.model.get_input_embeddings()(torch.tensor(prefix.token_ids, device=self.device))  # (n, H)
        if vectors is None:
            return emb
        return torch.cat([vectors.to(device=emb.device, dtype=emb.dtype), emb], dim=0)  # (l + n, H)

    def _resolve_prefixes(self, prompts: Sequence[str], prefixes) -> list[Tensor | None]:
        """The embedded prefix (l, H) of each prompt, or None: ``prefixes`` given, or the provider's (AUTO)."""
        if isinstance(prefixes, str) and prefixes == AUTO:
            prefixes = self.prefix_provider(prompts) if self.prefix_provider is not None else None
        if prefixes is None:
            return [None] * len(prompts)
        if len(prefixes) != len(prompts):
            raise RecipeError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
        return [None if p is None else self.prefix_embeddings(p) for p in prefixes]

    def embed(self, prompts: Sequence[str], prefixes=AUTO, targets: Sequence[str] | None = None,
              extra_tokens: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Left-padded ``[prefix_i ; prompt_i ; target_i]`` embeddings (B, T, H), mask (B, T), position ids (B, T).

        ``extra_tokens`` is room the caller will still generate, checked against the context.
        """
        if isinstance(prompts, str):
            raise RecipeError("prompts must be a list of strings, not one string")
        if not prompts:
            raise RecipeError("no prompts given")
        prefs = self._resolve_prefixes(prompts, prefixes)
        ids = [self.prompt_ids(p) for p in prompts]
        if targets is not None:
            if len(targets) != len(prompts):
                raise RecipeError(f"{len(targets)} targets for {len(prompts)} prompts")
            ids = [i + self.target_ids(t) for i, t in zip(ids, targets)]
        emb_layer = self.model.get_input_embeddings()
        rows = []
        for tok, pre in zip(ids, prefs):
            e = emb_layer(torch.tensor(tok, device=self.device))  # (n, H)
            if pre is not None:
                e = torch.cat([pre.to(device=e.device, dtype=e.dtype), e], dim=0)  # (l + n, H)
            rows.append(e)
        T = max(r.shape[0] for r in rows)
        if T + extra_tokens > self.max_length:
            raise RecipeError(f"input of {T} positions + {extra_tokens} new tokens exceeds the context of {self.max_length}")
        H = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), T, H)  # (B, T, H)
        mask = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)  # (B, T)
        for i, r in enumerate(rows):
            embeds[i, T - r.shape[0]:] = r
            mask[i, T - r.shape[0]:] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        return embeds, mask, position_ids

    # ---- teacher forcing ---------------------------------------------------------------------
    def target_logprobs(self, prompts: Sequence[str], targets: Sequence[str], prefixes=AUTO
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Differentiable teacher-forced target scores of one batch.

        Returns ``logprobs`` (B, L) of the gold tokens, ``argmax`` (B, L), ``labels`` (B, L) and
        ``mask`` (B, L) (1 on real target tokens; targets are right-aligned, L = longest target).
        """
        t_ids = [self.target_ids(t) for t in targets]
        L = max(len(t) for t in t_ids)
        embeds, mask, pos = self.embed(prompts, prefixes, targets)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                         logits_to_keep=self.target_columns(L), use_cache=False)
        return self.gold_logprobs(out.logits, t_ids)

    def target_columns(self, L: int) -> Tensor:
        """``logits_to_keep`` for the L columns whose logits predict the L (right-aligned) target slots of a
        prompt + target batch: the last L + 1 but one (the last column predicts past the target). The head
        then runs on L columns only, not L + 1 (half the vocab projection for one-token targets)."""
        return torch.arange(-L - 1, -1, device=self.device)

    def target_slots(self, t_ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Right-aligned target token ids (B, L) (padding id where a target is shorter than L) and the
        mask (B, L) of real target tokens, for the logits of :meth:`target_columns`."""
        L = max(len(t) for t in t_ids)
        labels = torch.full((len(t_ids), L), self.tokenizer.pad_token_id, device=self.device)
        tmask = torch.zeros(len(t_ids), L, device=self.device)
        for i, t in enumerate(t_ids):
            labels[i, L - len(t):] = torch.tensor(t, device=self.device)
            tmask[i, L - len(t):] = 1
        return labels, tmask

    def gold_logprobs(self, logits: Tensor, t_ids: list[list[int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``target_logprobs``'s outputs from the logits (B, L, V) of :meth:`target_columns`."""
        L = max(len(t) for t in t_ids)
        if logits.shape[1] != L:
            raise RecipeError(f"expected the logits of the {L} target columns, got {logits.shape[1]}")
        logits = logits.float()  # (B, L, V): column j predicts target slot j
        labels, tmask = self.target_slots(t_ids)
        logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]  # (B, L)
        return logp, logits.argmax(-1), labels, tmask

    def _cached_target_logprobs(self, prompts: Sequence[str], targets: Sequence[str], prefs: list[Tensor | None]
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``target_logprobs`` (no gradient) with the prefixes as cached keys/values, as in ``generate()``."""
        if all(p is None for p in prefs):
            return self.target_logprobs(prompts, targets, prefs)
        t_ids = [self.target_ids(t) for t in targets]
        cache, embeds, mask = self._cached_inputs(prompts, prefs, targets)
        P = mask.shape[1] - embeds.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]  # positions continue after each row's prefix
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, **cache_kwargs(self.model, cache),
                         logits_to_keep=self.target_columns(max(len(t) for t in t_ids)))
        return self.gold_logprobs(out.logits, t_ids)

    def _cached_inputs(self, prompts: Sequence[str], prefs: list[Tensor | None], targets: Sequence[str] | None = None,
                       extra_tokens: int = 0):
        """The prefixes' ``DynamicCache`` (P positions), the left-padded prompt(+target) embeddings
        (B, T, H) without them, and one mask (B, P + T) over both."""
        cache, prefix_mask = self.prefix_cache.batch(prefs)
        embeds, mask, _ = self.embed(prompts, None, targets, extra_tokens=extra_tokens + prefix_mask.shape[1])
        return cache, embeds, torch.cat([prefix_mask, mask], dim=1)

    def length_order(self, prompts: Sequence[str], targets: Sequence[str] | None = None) -> list[int]:
        """Row indices, shortest prompt (+ target) first (stable): batches of neighbours in this order pad
        little. zsRE's 4,000 evaluation queries (1,000 cases) are 72,534 tokens; batches of 16 in the
        given order pad them to 126,992, in this order to 74,032."""
        n = [len(self.prompt_ids(p)) for p in prompts]
        if targets is not None:
            n = [k + len(self.target_ids(t)) for k, t in zip(n, targets)]
        return sorted(range(len(prompts)), key=n.__getitem__)

    def _batches(self, prompts: Sequence[str], targets: Sequence[str] | None = None) -> Iterator[list[int]]:
        """Row indices of each batch of at most ``max_batch``: in :meth:`length_order` when there is more
        than one batch; one batch in the given order otherwise."""
        if 0 < len(prompts) <= self.max_batch:
            yield list(range(len(prompts)))
            return
        order = self.length_order(prompts, targets)
        for s in range(0, len(order), self.max_batch):
            yield order[s:s + self.max_batch]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], targets: Sequence[str], prefixes=AUTO,
              on_batch: Callable[[int], None] | None = None) -> list[TargetScore]:
        """Teacher-forced scores of each target after its prompt, in batches of ``max_batch`` rows of
        similar length (:meth:`length_order`), returned in the order given. ``on_batch(rows)`` after each
        batch (a progress bar)."""
        if len(targets) != len(prompts):
            raise RecipeError(f"{len(targets)} targets for {len(prompts)} prompts")
        prefs = self._resolve_prefixes(prompts, prefixes)
        result: list[TargetScore | None] = [None] * len(prompts)
        for rows in self._batches(prompts, targets):
            logp, pred, labels, tmask = self._cached_target_logprobs(
                [prompts[i] for i in rows], [targets[i] for i in rows], [prefs[i] for i in rows])
            for k, i in enumerate(rows):
                keep = tmask[k].bool()
                result[i] = TargetScore(tuple(labels[k, keep].tolist()), tuple(pred[k, keep].tolist()),
                                        tuple(logp[k, keep].tolist()))
            if on_batch is not None:
                on_batch(len(rows))
        return result  # type: ignore[return-value]

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts=None, max_new_tokens: int | None = None, prefixes=AUTO,
                 on_batch: Callable[[int], None] | None = None, **generate_kwargs):
        """Generate with the edits, in one of two signatures chosen by the first argument's type.

        Text: ``generate(["The capital of France is"], max_new_tokens=20) -> list[str]``, the decoded
        continuations (new text only). Greedy unless ``do_sample=True``; other keyword arguments go to HF
        ``generate``. More prompts than ``max_batch`` run in batches of similar length
        (:meth:`length_order`); the texts come back in the order given; ``on_batch(rows)`` after each batch.

        The model's own: ``generate(input_ids=ids, attention_mask=mask, **kwargs)`` (or the ids tensor
        first, or ``**tokenizer(texts, return_tensors="pt", padding=True)``, or the ids of
        ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")``)
        returns what ``self.model.generate`` returns for the same call: prompt + new ids, or a
        ``GenerateOutput``; sampling, beams, ``num_return_sequences``, logits processors, stopping
        criteria and streamers included. Retrieval sees each prompt's text (the last user message of a
        chat). With no edits, or no prefix for any row, it is the base model's output bit for bit
        (:mod:`recipe.hf_generate`).

        ``transformers.pipeline("text-generation", model=lm, tokenizer=lm.tokenizer)`` works through this
        signature (EditedLM exposes the ``config``, ``generation_config``, ``dtype`` and ``can_generate``
        the pipeline reads; it logs that the class 'EditedLM' is not in its list of supported models).
        """
        ids = generate_kwargs.pop("input_ids", None)
        ids = generate_kwargs.pop("inputs", ids)
        if isinstance(prompts, Tensor) or (prompts is None and ids is not None):
            from recipe.hf_generate import generate_like_hf

            if on_batch is not None:
                raise RecipeError("on_batch is for text prompts; with input_ids pass a streamer instead")
            if max_new_tokens is not None:
                generate_kwargs["max_new_tokens"] = max_new_tokens
            return generate_like_hf(self, prompts if prompts is not None else ids, prefixes=prefixes,
                                    **generate_kwargs)
        if prompts is None:
            raise RecipeError("generate() needs prompts (a list of strings) or input_ids (a tensor of token ids)")
        max_new_tokens = 20 if max_new_tokens is None else max_new_tokens
        prefs = self._resolve_prefixes(prompts, prefixes)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        texts: list[str | None] = [None] * len(prompts)
        for rows in self._batches(prompts):
            out = self._generate_batch([prompts[i] for i in rows], [prefs[i] for i in rows], max_new_tokens,
                                       generate_kwargs)
            for i, text in zip(rows, self.tokenizer.batch_decode(out, skip_special_tokens=True)):
                texts[i] = text
            if on_batch is not None:
                on_batch(len(rows))
        return texts  # type: ignore[return-value]

    def _generate_batch(self, prompts: Sequence[str], prefs: list[Tensor | None], max_new_tokens: int,
                        generate_kwargs: dict) -> Tensor:
        """New token ids (B, n) of one batch; prefixes enter as cached keys/values (``recipe.prefix_cache``)."""
        if all(p is None for p in prefs):
            embeds, mask, _ = self.embed(prompts, None, extra_tokens=max_new_tokens)
            return self.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       **generate_kwargs)
        cache, embeds, mask = self._cached_inputs(prompts, prefs, extra_tokens=max_new_tokens)
        P = mask.shape[1] - embeds.shape[1]
        embeds = torch.cat([embeds.new_zeros(len(prompts), P, embeds.shape[2]), embeds], dim=1)  # cached part: unused
        return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **cache_kwargs(self.model, cache),
                                   max_new_tokens=max_new_tokens, **generate_kwargs)

