"""Train the EditVerifier (recipe/retrieval/verifier.py) with Lightning, then export it.

    recipe train verifier [--max-steps N] [--fast-dev-run] [--out DIR] [--data-dir PATH] [--force]
        [--print-config]     (= python -m train.verifier ...)

Pairs (query, statement) come from the same training sets as RECIPE (``train.data.TRAIN_DATASETS``,
never the evaluation files): label 1 for the edit prompt and up to ``positives`` of its generality
probes (rephrases, aliases, logical/reasoning questions about the edited fact), label 0 for up to
``negatives`` of its locality probes (RippleEdits' Relation_Specificity: the same subject, another
relation; CounterFact's neighbourhood: the same relation, another subject; zsRE's unrelated NQ
questions) plus the prompt of one other random edit. Loss: binary cross-entropy. Logged: loss,
accuracy, acceptance of positives, rejection of negatives (train and held-out validation cases).
Resumes from ``<run_dir>/checkpoints/last.ckpt``; W&B offline by default; the CLI is train.cli's.
"""
from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from recipe.artifacts import load_verifier, save_verifier
from recipe.retrieval.verifier import EditVerifier, VerifierArchitecture
from recipe.types import EditCase
from train.config import Precision, TrainConfig
from train.recipe import fit, run_cli

Pair = tuple[str, str, float]  # (query, statement, label)


@dataclass(kw_only=True)
class VerifierTrainConfig(TrainConfig):
    """The EditVerifier's trainer; the shared settings are documented in train.config.TrainConfig."""

    kind: ClassVar[str] = "verifier"

    architecture: VerifierArchitecture = field(default_factory=VerifierArchitecture)  # the cross-encoder's shape
    positives: int = 3  # generality probes per edit (besides its prompt)
    negatives: int = 3  # locality probes per edit (besides one other edit's prompt)
    val_fraction: float = 0.05  # held-out share of the edits
    threshold: float = 0.5  # written to the artefact: accept when p > threshold
    batch_size: int = 32  # (query, statement) pairs per step
    lr: float = 1.0e-3  # Adam, the head
    body_lr: float = 3.0e-5  # Adam, the trained body layers
    warmup_steps: int = 30
    max_steps: int = 600
    val_every: int = 100
    limit_val_batches: int = 20
    precision: Precision = "32-true"


def case_pairs(cases: Sequence[EditCase], positives: int, negatives: int, seed: int) -> list[Pair]:
    """Labelled (query, statement) pairs of ``cases`` (see the module docstring), drawn under ``seed``."""
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for i, case in enumerate(cases):
        statement = case.requests[0].statement
        gen = [g.prompt for g in case.generality]
        loc = [p.prompt for p in case.locality if p.prompt != case.requests[0].prompt]
        pairs.append((case.requests[0].prompt, statement, 1.0))
        pairs += [(q, statement, 1.0) for q in rng.sample(gen, min(positives, len(gen)))]
        pairs += [(q, statement, 0.0) for q in rng.sample(loc, min(negatives, len(loc)))]
        j = rng.randrange(len(cases))  # one other edit's question: an easy negative
        if j != i and cases[j].requests[0].subject != case.requests[0].subject:
            pairs.append((cases[j].requests[0].prompt, statement, 0.0))
    return pairs


def split_pairs(cfg: VerifierTrainConfig, cases_by_set: dict[str, list[EditCase]]) -> tuple[list[Pair], list[Pair]]:
    """Train / validation pairs; validation holds out whole edits (``val_fraction`` of each set)."""
    train, val = [], []
    for name, cases in cases_by_set.items():
        cases = list(cases)
        random.Random(cfg.seed).shuffle(cases)
        n_val = max(1, int(len(cases) * cfg.val_fraction)) if len(cases) > 1 else 0
        val += case_pairs(cases[:n_val], cfg.positives, cfg.negatives, cfg.seed)
        train += case_pairs(cases[n_val:], cfg.positives, cfg.negatives, cfg.seed + 1)
    return train, val


def _collate(batch: list[Pair]):
    return [b[0] for b in batch], [b[1] for b in batch], torch.tensor([b[2] for b in batch])


def _module(verifier: EditVerifier, cfg: VerifierTrainConfig):
    import lightning as L

    class VerifierModule(L.LightningModule):
        """Thin: BCE on the verifier's logits; metrics per split."""

        def __init__(self):
            super().__init__()
            self.verifier = verifier

        def _step(self, batch, split: str):
            queries, statements, labels = batch
            logits = self.verifier(queries, statements)
            labels = labels.to(logits.device)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
            accept = torch.sigmoid(logits.float()) > cfg.threshold
            pos, neg = labels > 0.5, labels < 0.5
            n = len(queries)
            self.log(f"{split}/loss", loss, batch_size=n, prog_bar=split == "train")
            self.log(f"{split}/accuracy", (accept == pos).float().mean(), batch_size=n)
            if pos.any():
                self.log(f"{split}/accept_positive", accept[pos].float().mean(), batch_size=int(pos.sum()))
            if neg.any():
                self.log(f"{split}/reject_negative", (~accept[neg]).float().mean(), batch_size=int(neg.sum()))
            return loss

        def training_step(self, batch, batch_idx):
            return self._step(batch, "train")

        def validation_step(self, batch, batch_idx):
            self._step(batch, "val")

        def configure_optimizers(self):
            body = [p for n, p in self.verifier.named_parameters() if p.requires_grad and n.startswith("body.")]
            head = [p for n, p in self.verifier.named_parameters() if p.requires_grad and not n.startswith("body.")]
            opt = torch.optim.AdamW([{"params": head, "lr": cfg.lr}, {"params": body, "lr": cfg.body_lr}],
                                    weight_decay=0.01)
            warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}

    return VerifierModule()


@dataclass
class VerifierTrainResult:
    artifact: Path
    global_step: int
    metrics: dict[str, float]


def train(cfg: VerifierTrainConfig, *, cases_by_set: dict[str, list[EditCase]] | None = None,
          fast_dev_run: bool = False, resume: bool = True, progress: bool = True) -> VerifierTrainResult:
    """Fit (resuming from ``<run_dir>/checkpoints/last.ckpt``) and export; ``cases_by_set`` is injectable."""
    cfg = cfg.resolved()
    import lightning as L
    from torch.utils.data import DataLoader

    from recipe.data import load_dataset

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cases_by_set is None:
        cases_by_set = {name: load_dataset(name, cfg.data_dir, cfg.limit_per_dataset) for name in cfg.datasets}
    train_pairs, val_pairs = split_pairs(cfg, cases_by_set)
    verifier = load_verifier(cfg.init_from)[0].train() if cfg.init_from else EditVerifier(cfg.architecture, cfg.seed)
    if cfg.init_from:  # load_verifier freezes everything: let the trained layers and head learn again
        for name, p in verifier.named_parameters():
            p.requires_grad_(not name.startswith("body.") or name.startswith(verifier.trained_prefixes))
    module = _module(verifier, cfg)
    loader = lambda pairs, shuffle: DataLoader(pairs, batch_size=cfg.batch_size, shuffle=shuffle,  # noqa: E731
                                               collate_fn=_collate, num_workers=cfg.num_workers)
    trainer = fit(cfg, module, fast_dev_run=fast_dev_run, resume=resume, progress=progress,
                  fit_kwargs={"train_dataloaders": loader(train_pairs, True), "val_dataloaders": loader(val_pairs, False)},
                  val_check_interval=min(cfg.val_every, max(1, len(train_pairs) // cfg.batch_size)))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if val_pairs:  # the held-out metrics of the exported weights, also when the fit resumed at max_steps
        metrics.update({k: float(v) for k, v in trainer.validate(module, dataloaders=loader(val_pairs, False),
                                                                  verbose=False)[0].items()})
    artifact = Path(cfg.out)
    if trainer.is_global_zero:  # with several processes, one writes the artefact
        artifact = save_verifier(verifier, cfg.out, cfg.threshold,
                                 extra={"steps": trainer.global_step, "datasets": list(cases_by_set),
                                        "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
                                        "config": dataclasses.asdict(cfg), "last_metrics": metrics})
    return VerifierTrainResult(artifact, trainer.global_step, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(argv, "verifier")


if __name__ == "__main__":
    sys.exit(main())
