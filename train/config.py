"""What every trainer's config shares (RECIPE, MEND, the verifier): data, optimiser schedule, Lightning
and logging settings. Settings without a default here are given one by each trainer's config."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from train.data import TRAIN_DATASETS

WandbMode = Literal["online", "offline", "disabled"]
Precision = Literal["32-true", "bf16-mixed", "16-mixed"]


@dataclass(kw_only=True)
class TrainConfig:
    kind: ClassVar[str]  # "recipe", "mend", "verifier": names the default run folder
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
    run_dir: str | None = None  # Lightning checkpoints + W&B files; None: runs/<kind>-<model>
    out: str | None = None  # the exported artefact; None: <run_dir>/export
    wandb: WandbMode = "offline"  # overridden by --wandb, then $WANDB_MODE
    wandb_project: str = "recipe"  # W&B project name
    log_every: int = 10  # steps between logged rows

    def resolved(self):
        """This config with ``run_dir`` (default ``runs/<kind>-<model>``, relative to the current folder) and
        ``out`` (default ``<run_dir>/export``) filled in, and a relative ``init_from`` that is not found here
        looked up in the source checkout (the shipped configs name shipped artefacts that way)."""
        from recipe.config import repo_root

        model = getattr(self, "model", None)
        slug = self.kind if model is None else f"{self.kind}-{model_slug(model)}"
        run_dir = self.run_dir or str(Path("runs") / slug)
        init_from = self.init_from
        if init_from and not Path(init_from).is_absolute() and not Path(init_from).exists():
            init_from = str(repo_root() / init_from)
        return dataclasses.replace(self, run_dir=run_dir, out=self.out or str(Path(run_dir) / "export"),
                                   init_from=init_from)


def model_slug(model: str) -> str:
    """A folder name for ``model``: a local folder's own name, a Hugging Face id with ``--`` for ``/``."""
    path = Path(model).expanduser()
    return path.name if os.sep in model and path.exists() else model.replace("/", "--")
