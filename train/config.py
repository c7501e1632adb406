"""What every trainer's config shares (RECIPE, MEND, the verifier): data, optimiser schedule, Lightning
and logging settings. Settings without a default here are given one by each trainer's config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from train.data import TRAIN_DATASETS

WandbMode = Literal["online", "offline", "disabled"]
Precision = Literal["32-true", "bf16-mixed", "16-mixed"]


@dataclass(kw_only=True)
class TrainConfig:
    init_from: str | None = None  # an exported artefact folder to start from; None: fresh networks
    datasets: list[str] = field(default_factory=lambda: list(TRAIN_DATASETS))  # training sets (load_dataset names)
    data_dir: str | None = None  # dataset folder; None: $RECIPE_DATA_DIR
    limit_per_dataset: int | None = None  # first N cases of each set (smoke runs)
    batch_size: int  # examples per optimiser step
    lr: float  # Adam learning rate of the networks' heads
    warmup_steps: int  # linear learning-rate warm-up
    grad_clip: float = 1.0  # gradient-norm clipping; 0 disables
    max_steps: int  # optimiser steps
    val_every: int  # steps between validations and last.ckpt saves
    limit_val_batches: int  # validation batches per validation
    precision: Precision  # Lightning precision; bf16 autocast works on CPU too
    accelerator: str = "auto"  # "cpu", "gpu", "auto"
    devices: int | str = "auto"  # number of devices or "auto"
    strategy: str = "auto"  # e.g. "ddp" on several GPUs
    num_workers: int = 0  # DataLoader workers
    seed: int = 0  # data split, shuffling and network initialisation
    run_dir: str  # Lightning checkpoints + W&B files
    out: str  # the exported artefact
    wandb: WandbMode = "offline"  # overridden by --wandb, then $WANDB_MODE
    wandb_project: str = "recipe"  # W&B project name
    log_every: int = 10  # steps between logged rows
