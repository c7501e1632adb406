"""RecipeModule: the RECIPE losses around a frozen EditedLM (Chen et al. 2024, sec. 3.4).

For a batch of B edits with statements k_i, queries q_i (edit prompt), q'_i (paraphrase) and
locality prompts x_i, scores s(q, k) = r_q . r_k / sqrt(D) and the sentinel's s(q, r_s):

- retrieval, edit:      -log softmax_{k_1..k_B, r_s}(s(q, .))[k_i] for q in {q_i, q'_i}  (own knowledge first)
- retrieval, sentinel:  -log softmax_{k_j (j != i), r_s}(s(q, .))[r_s]                  (own knowledge absent:
                                                                                        the sentinel beats the rest)
- retrieval, locality:  -log softmax_{k_1..k_B, r_s}(s(x_i, .))[r_s]                    (unrelated: retrieve nothing)
- reliability / generality: NLL of target_new after [p_i ; q_i] and [p_i ; q'_i]
- locality: KL(f(x_i) || f([p_i ; x_i])) on x_i's answer tokens (the prompt must not disturb
  unrelated inputs even when retrieved by mistake, as in the paper)

and, for edits whose case has a scope probe h_i (another question about the same subject, e.g.
"DiCaprio's occupation" beside an edit of his citizenship; ``train.data.SCOPE_GROUPS``), two terms
that are not in the paper (weights 0 by default):

- retrieval, scope:     -log softmax_{k_1..k_B, r_s}(s(h_i, .))[r_s]                    (same subject, other
                                                                                        fact: retrieve nothing,
                                                                                        not even k_i)
- scope:  KL(f(h_i) || f([p_i ; h_i])) on h_i's answer tokens (retrieved by mistake for a question it
  does not answer, the edit's prompt leaves that answer alone)

with p_i the prefix built from k_i (oracle retrieval). All weights default to 1. The LM never trains.

With several processes (``--devices N --strategy ddp``) each has its own batch; the knowledge keys k_j
of all N batches are gathered with their gradient (``all_gather(sync_grads=True)``), so the retrieval
softmaxes run over all N·B keys as in one batch of N·B edits; the edit losses stay per process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from recipe.editors.recipe import PrefixMode, edit_prefix
from recipe.lm import EditedLM
from recipe.retrieval.networks import RecipeNetworks
from recipe.retrieval.statements import DEFAULT_SEPARATOR, statement_token_ids
from train.data import TrainExample


@dataclass
class LossWeights:
    retrieval_edit: float = 1.0  # query (prompt, paraphrase) -> own knowledge over others and the sentinel
    retrieval_sentinel: float = 1.0  # query without its knowledge -> sentinel over the rest
    retrieval_locality: float = 1.0  # locality prompt -> sentinel over all knowledge
    reliability: float = 1.0  # NLL of target_new after the prefixed edit prompt
    generality: float = 1.0  # NLL of target_new after the prefixed paraphrase
    locality: float = 1.0  # KL(base || prefixed) on locality answers
    retrieval_scope: float = 0.0  # another question about the edit's subject -> sentinel over all knowledge
    scope: float = 0.0  # KL(base || prefixed with the edit's own prefix) on that question's answer


def target_logits(lm: EditedLM, prompts: Sequence[str], targets: Sequence[str], prefixes
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Full-vocabulary logits at each target slot (the layout of ``EditedLM.target_logprobs``).

    Returns logits (N, L, V) float32, labels (N, L) and mask (N, L), targets right-aligned.
    """
    t_ids = [lm.target_ids(t) for t in targets]
    n_slots = max(len(t) for t in t_ids)
    embeds, mask, pos = lm.embed(prompts, prefixes, targets)
    out = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                   logits_to_keep=lm.target_columns(n_slots), use_cache=False)
    labels, tmask = lm.target_slots(t_ids)
    return out.logits.float(), labels, tmask  # (N, L, V): slot j predicts target token j


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


class RecipeModule(L.LightningModule):
    """Holds the trainable ``RecipeNetworks`` and the frozen LM; computes and logs the RECIPE losses."""

    def __init__(self, lm: EditedLM, networks: RecipeNetworks, *, prefix_mode: PrefixMode = "vectors+statement",
                 weights: LossWeights | None = None, lr: float = 1.0e-4, body_lr: float = 2.0e-5,
                 sentinel_lr: float = 3.0e-3, warmup_steps: int = 100,
                 statement_separator: str = DEFAULT_SEPARATOR):
        super().__init__()
        self.lm = lm.requires_grad_(False).eval()  # a submodule so that it follows the device; never saved
        self.networks = networks
        self.prefix_mode, self.weights = prefix_mode, weights or LossWeights()
        self.separator = statement_separator
        self.lr, self.body_lr, self.sentinel_lr, self.warmup_steps = lr, body_lr, sentinel_lr, warmup_steps
        self.strict_loading = False  # checkpoints hold only the trained tensors

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # the frozen LM never runs in training mode
        return self

    # ---- the losses --------------------------------------------------------------------------
    def _all_keys(self, r_k: Tensor, batch: Sequence[TrainExample]) -> tuple[Tensor, list[TrainExample], int]:
        """The knowledge keys every query is scored against: with several processes (DDP) those of every
        process's batch, gathered with their gradient (each process's keys are the others' negatives, as
        one large batch would have them); else this batch's. Returns keys (N, D), their examples and the
        index of this batch's first key among them."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return r_k, list(batch), 0
        import torch.distributed as dist

        keys = self.all_gather(r_k, sync_grads=True)  # (W, B, D); the loader drops uneven last batches
        parts: list[list[TrainExample]] = [[] for _ in range(trainer.world_size)]
        dist.all_gather_object(parts, list(batch))
        return keys.reshape(-1, r_k.shape[-1]), [e for part in parts for e in part], trainer.global_rank * len(batch)

    def _retrieval(self, batch: Sequence[TrainExample], loc_rows: list[int], scope_rows: Sequence[int] = ()):
        """r_k (B, D) of this batch and the retrieval losses/metrics, negatives from every process's batch."""
        enc, B = self.networks.encoder, len(batch)
        texts = ([e.statement for e in batch] + [e.prompt for e in batch] + [e.paraphrase for e in batch]
                 + [batch[i].locality_prompt for i in loc_rows] + [batch[i].scope_prompt for i in scope_rows])
        feats = enc.features(texts)  # (B + 2B + n_loc, 2d)
        r_k = enc.knowledge_head(feats[:B])  # (B, D)
        r_q = enc.query_head(feats[B:])  # (2B + n_loc, D)
        keys, key_examples, offset = self._all_keys(r_k, batch)
        N = len(key_examples)  # B, or W * B with W processes
        scores = enc.score(r_q, keys)  # (Q, N)
        sentinel = self.networks.sentinel(r_q)  # (Q,)
        conflicts = self._conflicts(batch, loc_rows, key_examples, offset, scope_rows)  # other keys also right
        scores = scores.masked_fill(conflicts.to(scores.device), -math.inf)
        logits = torch.cat([scores, sentinel[:, None]], dim=1)  # (Q, N + 1); column N is the sentinel
        own = offset + torch.arange(B, device=logits.device).repeat(2)  # (2B,)
        edit_logits = logits[:2 * B]
        without_own = edit_logits.masked_fill(F.one_hot(own, N + 1).bool(), -math.inf)
        sentinel_col = torch.full_like(own, N)
        losses = {"retrieval_edit": F.cross_entropy(edit_logits, own),
                  "retrieval_sentinel": F.cross_entropy(without_own, sentinel_col)}
        own_score = edit_logits.gather(1, own[:, None])[:, 0]  # (2B,)
        metrics = {"retrieval/top1": (scores[:2 * B].argmax(1) == own).float().mean(),
                   "retrieval/keys": torch.tensor(float(N)),  # own key + negatives each query is scored against
                   "sentinel/accept_prompt": (own_score[:B] > sentinel[:B]).float().mean(),
                   "sentinel/accept_paraphrase": (own_score[B:] > sentinel[B:2 * B]).float().mean()}
        start = 2 * B
        for name, rows in (("locality", loc_rows), ("scope", scope_rows)):  # retrieve nothing: the sentinel
            if rows:
                part = slice(start, start + len(rows))
                losses[f"retrieval_{name}"] = F.cross_entropy(logits[part], torch.full_like(logits[part, 0], N).long())
                metrics[f"sentinel/reject_{name}"] = (sentinel[part] > scores[part].amax(1)).float().mean()
                start += len(rows)
        return r_k, losses, metrics

    @staticmethod
    def _conflicts(batch: Sequence[TrainExample], loc_rows: list[int], keys: Sequence[TrainExample] | None = None,
                   offset: int = 0, scope_rows: Sequence[int] = ()) -> Tensor:
        """(Q, N) True where key j (of ``keys``, default ``batch``; this batch's own keys start at ``offset``)
        is not a fair negative for query row q: it shares the query's prompt or the query's statement."""
        keys = list(batch) if keys is None else keys
        rows = [(i, e.prompt) for i, e in enumerate(batch)] + [(i, e.paraphrase) for i, e in enumerate(batch)]
        rows += [(-1, batch[i].locality_prompt) for i in loc_rows] + [(-1, batch[i].scope_prompt) for i in scope_rows]
        out = torch.zeros(len(rows), len(keys), dtype=torch.bool)
        for q, (i, text) in enumerate(rows):
            for j, e in enumerate(keys):
                if (i < 0 or j != offset + i) and (text in (e.prompt, e.paraphrase) or (i >= 0 and e.statement == batch[i].statement)):
                    out[q, j] = True
        return out

    def _edit(self, batch: Sequence[TrainExample], loc_rows: list[int], r_k: Tensor, scope_rows: Sequence[int] = ()):
        """Edit losses with each edit's own prefix (oracle retrieval)."""
        B, lm = len(batch), self.lm
        vectors = self.networks.prompt_encoder(r_k)  # (B, l, H)
        token_ids = [statement_token_ids(lm, e.statement, self.separator) if self.prefix_mode == "vectors+statement" else None
                     for e in batch]
        prefixes = [edit_prefix(v, t) for v, t in zip(vectors, token_ids)]
        probes = [(batch[i].locality_prompt, batch[i].locality_answer, i) for i in loc_rows]
        probes += [(batch[i].scope_prompt, batch[i].scope_answer, i) for i in scope_rows]
        prompts = [e.prompt for e in batch] + [e.paraphrase for e in batch] + [p for p, _, _ in probes]
        targets = [e.target for e in batch] * 2 + [a for _, a, _ in probes]
        logits, labels, mask = target_logits(lm, prompts, targets, prefixes * 2 + [prefixes[i] for _, _, i in probes])
        logp = torch.log_softmax(logits, -1)  # (N, L, V)
        nll = -logp.gather(-1, labels[..., None])[..., 0]  # (N, L)
        hit = (logits.argmax(-1) == labels).float()
        losses = {"reliability": _masked_mean(nll[:B], mask[:B]), "generality": _masked_mean(nll[B:2 * B], mask[B:2 * B])}
        metrics = {"edit/reliability_acc": _masked_mean(hit[:B], mask[:B]),
                   "edit/generality_acc": _masked_mean(hit[B:2 * B], mask[B:2 * B])}
        start = 2 * B
        for name, rows in (("locality", loc_rows), ("scope", scope_rows)):
            if rows:
                part = slice(start, start + len(rows))
                losses[name], metrics[f"edit/{name}_acc"] = self._unchanged(
                    logits[part], logp[part], mask[part], prompts[part], targets[part])
                start += len(rows)
        return losses, metrics

    def _unchanged(self, logits: Tensor, logp: Tensor, mask: Tensor, prompts: list[str], targets: list[str]
                   ) -> tuple[Tensor, Tensor]:
        """Prefixed rows against the LM without a prefix: KL(base || prefixed) over the answer tokens, and
        the fraction of answer tokens whose argmax is unchanged."""
        with torch.no_grad():
            base, _, _ = target_logits(self.lm, prompts, targets, None)
        n_slots = base.shape[1]  # targets are right-aligned: the last n_slots slots of the prefixed rows
        base_logp = torch.log_softmax(base, -1)  # (n, L', V)
        kl = (base_logp.exp() * (base_logp - logp[:, -n_slots:])).sum(-1)  # (n, L')
        same = logits[:, -n_slots:].argmax(-1) == base.argmax(-1)
        return _masked_mean(kl, mask[:, -n_slots:]), _masked_mean(same.float(), mask[:, -n_slots:])

    def _step(self, batch: Sequence[TrainExample]) -> tuple[Tensor, dict[str, Tensor]]:
        edit_texts = {t for e in batch for t in (e.prompt, e.paraphrase)}
        loc_rows = [i for i, e in enumerate(batch) if e.locality_prompt is not None and e.locality_prompt not in edit_texts]
        scoped = self.weights.retrieval_scope or self.weights.scope or not self.training  # validation: measured
        scope_rows = [i for i, e in enumerate(batch) if scoped and e.scope_prompt is not None
                      and e.scope_prompt not in edit_texts]
        r_k, losses, metrics = self._retrieval(batch, loc_rows, scope_rows)
        edit_losses, edit_metrics = self._edit(batch, loc_rows, r_k, scope_rows)
        losses.update(edit_losses)
        metrics.update(edit_metrics)
        total = sum(getattr(self.weights, name) * value for name, value in losses.items())
        return total, {"loss": total, **{f"loss/{k}": v for k, v in losses.items()}, **metrics}

    # ---- Lightning hooks ---------------------------------------------------------------------
    def training_step(self, batch: list[TrainExample], batch_idx: int) -> Tensor:
        loss, logs = self._step(batch)
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, batch_size=len(batch))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=len(batch))
        return loss

    def validation_step(self, batch: list[TrainExample], batch_idx: int) -> None:
        _, logs = self._step(batch)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, batch_size=len(batch), on_epoch=True)

    def configure_optimizers(self):
        groups: dict[str, list] = {"rest": [], "body": [], "sentinel": []}
        for name, p in self.networks.named_parameters():
            if p.requires_grad:
                kind = "body" if name.startswith("encoder.body.") else "sentinel" if name.startswith("sentinel.") else "rest"
                groups[kind].append(p)
        # The sentinel's threshold must travel the score scale (~sqrt(D)) quickly: its own, larger rate.
        lrs = {"rest": self.lr, "body": self.body_lr, "sentinel": self.sentinel_lr}
        groups = [{"params": ps, "lr": lrs[kind], "name": kind} for kind, ps in groups.items() if ps]
        optimizer = torch.optim.Adam(groups)
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trained tensors: not the frozen LM, not the frozen body layers."""
        keep = {f"networks.{k}" for k in self.networks.artifact_state()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
