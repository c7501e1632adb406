"""Training examples for RECIPE and their LightningDataModule.

One ``TrainExample`` per edit request: the statement to store, the edit prompt and a paraphrase
with its target (reliability, generality), one unrelated prompt + answer (locality) and, where the
case has one, a *scope* probe: another question about the same subject whose answer the edit does not
change (RippleEdits' Relation_Specificity probes, :data:`SCOPE_GROUPS`). A case without a paraphrase
whose target is ``target_new`` uses the prompt itself; a case without a locality or scope probe has
none (its terms are masked out of the batch).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader

from recipe.data import load_dataset
from recipe.errors import ConfigError
from recipe.types import EditCase

log = logging.getLogger(__name__)

TRAIN_DATASETS = ("counterfact-train", "ripple-recent-train", "ripple-cf-train", "zsre-train")
SCOPE_GROUPS = ("Relation_Specificity",)  # locality probes that ask another question about the edit's subject


@dataclass(frozen=True)
class TrainExample:
    """One edit with the queries that train retrieval and the prompt encoder."""

    prompt: str
    target: str  # target_new
    paraphrase: str  # a generality prompt answered by ``target`` (the prompt itself when none)
    locality_prompt: str | None  # an unrelated prompt whose answer must not change
    locality_answer: str | None
    scope_prompt: str | None = None  # another question about the same subject: its answer must not change
    scope_answer: str | None = None

    @property
    def statement(self) -> str:
        return f"{self.prompt} {self.target}"


def examples_from_cases(cases: Sequence[EditCase], seed: int = 0) -> list[TrainExample]:
    """One example per request; paraphrase, locality and scope probes picked under ``seed`` (the scope
    probe from a stream of its own, so the other picks are those of a run without scope probes)."""
    rng, scope_rng = random.Random(seed), random.Random(f"scope:{seed}")
    out = []
    for case in cases:
        for request in case.requests:
            paraphrases = [p.prompt for p in case.generality if p.target == request.target_new]
            locality = [p for p in case.locality if p.prompt != request.prompt]
            loc = rng.choice(locality) if locality else None
            scope = [p for p in locality if p.group in SCOPE_GROUPS]
            sc = scope_rng.choice(scope) if scope else None
            out.append(TrainExample(request.prompt, request.target_new,
                                    rng.choice(paraphrases) if paraphrases else request.prompt,
                                    loc.prompt if loc else None, loc.target if loc else None,
                                    sc.prompt if sc else None, sc.target if sc else None))
    return out


def collate(batch: list[TrainExample]) -> list[TrainExample]:
    return list(batch)


class RecipeDataModule(L.LightningDataModule):
    """Training edits from the four RECIPE training sets (or given ``cases``), a held-out validation split."""

    def __init__(self, datasets: Sequence[str] = TRAIN_DATASETS, data_dir: str | Path | None = None,
                 batch_size: int = 8, val_size: int = 256, limit_per_dataset: int | None = None,
                 seed: int = 0, num_workers: int = 0, cases: Sequence[EditCase] | None = None,
                 repeats: dict[str, int] | None = None):
        super().__init__()
        self.datasets, self.data_dir, self.batch_size = tuple(datasets), data_dir, batch_size
        self.val_size, self.limit, self.seed, self.num_workers = val_size, limit_per_dataset, seed, num_workers
        self._cases = None if cases is None else list(cases)
        self.repeats = dict(repeats or {})
        unknown = sorted(set(self.repeats) - set(self.datasets))
        if unknown or any(not isinstance(n, int) or n < 1 for n in self.repeats.values()):
            raise ConfigError(f"dataset_repeats must map training sets {list(self.datasets)} to integers >= 1; "
                              f"got {self.repeats}")
        self.train_examples: list[TrainExample] = []
        self.val_examples: list[TrainExample] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        if self._cases is not None:
            sets = {"cases": self._cases}
        else:
            sets = {name: load_dataset(name, self.data_dir, self.limit) for name in self.datasets}
        val, train = [], []
        for name, cases in sets.items():  # the validation share of each set is held out before repeating
            examples = examples_from_cases(cases, self.seed)
            random.Random(self.seed).shuffle(examples)
            total = sum(len(c.requests) for cs in sets.values() for c in cs)
            n_val = min(self.val_size, total // 5) * len(examples) // max(total, 1)
            val += examples[:n_val]
            held = {e.prompt for e in examples[:n_val]}
            train += examples[n_val:]
            for r in range(1, self.repeats.get(name, 1)):  # repeats draw other paraphrases / locality probes
                train += [e for e in examples_from_cases(cases, self.seed + r) if e.prompt not in held]
        random.Random(self.seed).shuffle(train)
        random.Random(self.seed).shuffle(val)  # every validation batch mixes the sets (limit_val_batches cuts a prefix)
        self.val_examples, self.train_examples = val, train
        n_val = len(val)
        log.info("RECIPE training data: %d train / %d validation edits", len(self.train_examples), n_val)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # texts only (Lightning cannot move frozen dataclasses); tensors are made on the model's device

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_examples, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          collate_fn=collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_examples, batch_size=self.batch_size, shuffle=False, drop_last=True,
                          collate_fn=collate, num_workers=self.num_workers)
