"""Train RECIPE's retriever, prompt encoder and sentinel against a frozen LM, then export the artefact.

    recipe train recipe --model smollm2-135m [--config recipe-finetune] [--max-steps N] [--fast-dev-run]
        [--out DIR] [--run-dir DIR] [--data-dir PATH] [--devices N --strategy ddp] [--force] [--print-config]

(``python -m train.recipe ARGS`` is the same command; train.cli builds it: every config field is a flag.)
Lightning checkpoints go to ``<run_dir>/checkpoints/last.ckpt`` (every ``val_every`` steps and at the
end); a run whose ``last.ckpt`` exists resumes from it (``--no-resume`` starts afresh). Weights &
Biases logs offline by default (``--wandb``, else ``$WANDB_MODE``, else the config). At the end the
trained networks are exported (fp16 safetensors + ``recipe.json``) to ``out`` (default
``runs/recipe-<model>/export``): the folder that ``recipe.yaml``'s editor ``checkpoint`` names.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

from recipe.errors import ConfigError, RecipeError
from recipe.artifacts import DEFAULT_SEPARATOR, load_recipe_artifact, save_recipe_artifact
from recipe.editors.recipe import PrefixMode, RecipeNetworks
from recipe.lm import EditedLM
from recipe.retrieval.encoders import RecipeArchitecture
from recipe.retrieval.sentinel import SentinelMode
from recipe.types import EditCase
from train.callbacks import DurationEstimate, StepTimer
from train.config import Precision, TrainConfig
from train.data import RecipeDataModule
from train.module import LossWeights, RecipeModule

log = logging.getLogger("train.recipe")


@dataclass(kw_only=True)
class RecipeTrainConfig(TrainConfig):
    """RECIPE's trainer; the shared settings are documented in train.config.TrainConfig."""

    kind: ClassVar[str] = "recipe"

    model: str = "smollm2-135m"  # the frozen LM (configs/models/ name, HF id or folder)
    architecture: RecipeArchitecture = field(default_factory=RecipeArchitecture)  # shapes of the networks
    prefix_mode: PrefixMode = "vectors+statement"  # what the LM sees: l vectors [+ the statement's tokens]
    statement_separator: str = DEFAULT_SEPARATOR  # after the statement in the prefix, before the query
    sentinel_mode: SentinelMode = "learned"  # "fixed": constant threshold (ablation)
    threshold: float = 0.0  # the fixed mode's threshold
    weights: LossWeights = field(default_factory=LossWeights)  # loss weights (paper: all 1)
    dataset_repeats: dict[str, int] = field(default_factory=dict)  # e.g. {zsre-train: 4}: more weight on small sets
    val_size: int = 256  # held-out edits for validation
    batch_size: int = 8  # edits per step (paper: 8)
    lr: float = 1.0e-4  # Adam, heads / prompt encoder
    body_lr: float = 2.0e-5  # Adam, the trained layers of the sentence-encoder body
    sentinel_lr: float = 3.0e-3  # Adam, the sentinel (r_s, b): moves on the score scale ~sqrt(D); 1e-2 oscillated
    warmup_steps: int = 100
    max_steps: int = 20000
    val_every: int = 500
    limit_val_batches: int = 16
    precision: Precision = "bf16-mixed"


@dataclass
class TrainResult:
    artifact: Path
    global_step: int
    metrics: dict[str, float]  # the last logged value of every metric


def load_lm(name: str) -> EditedLM:
    from recipe.models import load_model

    model, tokenizer, spec = load_model(name)
    return EditedLM(model, tokenizer, spec)


def _logger(cfg: TrainConfig, run_dir: Path):
    if cfg.wandb == "disabled":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(run_dir), name="csv")
    from lightning.pytorch.loggers import WandbLogger

    run_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=cfg.wandb_project, save_dir=str(run_dir), offline=cfg.wandb == "offline",
                       config=dataclasses.asdict(cfg))


def fit(cfg, module, *, fast_dev_run: bool, resume: bool, progress: bool, fit_kwargs: dict,
        val_check_interval: int | None = None, **trainer_kwargs):
    """The Lightning run shared by train.recipe, train.mend and train.verifier: W&B (or CSV) logger,
    step timer, ``<run_dir>/checkpoints/last.ckpt`` every ``val_every`` steps and resumption from it;
    ``trainer_kwargs`` go to ``L.Trainer``. Returns the fitted trainer."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    logger = None if fast_dev_run else _logger(cfg, run_dir)
    callbacks = [StepTimer(cfg.log_every), DurationEstimate()] + ([] if fast_dev_run else [
        ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_train_steps=cfg.val_every)])
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(max_steps=cfg.max_steps, precision=cfg.precision, accelerator=cfg.accelerator,
                        devices=cfg.devices, strategy=cfg.strategy, logger=logger if logger is not None else False,
                        callbacks=callbacks, fast_dev_run=fast_dev_run, enable_checkpointing=not fast_dev_run,
                        val_check_interval=val_check_interval or cfg.val_every, check_val_every_n_epoch=None,
                        limit_val_batches=cfg.limit_val_batches, gradient_clip_val=cfg.grad_clip or None,
                        log_every_n_steps=cfg.log_every, default_root_dir=str(run_dir),
                        enable_progress_bar=progress, enable_model_summary=not fast_dev_run, **trainer_kwargs)
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if resume and not fast_dev_run and last.exists() else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    try:  # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=True, **fit_kwargs)
    except pickle.UnpicklingError as err:
        raise RecipeError(f"{ckpt_path} holds more than tensors and plain values; refusing to resume from it "
                          f"(delete it or pass --no-resume): {str(err).splitlines()[0]}") from None
    return trainer


def train(cfg: RecipeTrainConfig, *, lm: EditedLM | None = None, cases: Sequence[EditCase] | None = None,
          fast_dev_run: bool = False, resume: bool = True, progress: bool = True) -> TrainResult:
    """Fit (resuming from ``<run_dir>/checkpoints/last.ckpt`` when present) and export the artefact.

    ``lm`` and ``cases`` are injectable (tests pass the tiny LM and the demo edits).
    """
    cfg = cfg.resolved()
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    lm = lm if lm is not None else load_lm(cfg.model)
    if cfg.init_from is None:
        networks = RecipeNetworks.build(lm, cfg.architecture, sentinel_mode=cfg.sentinel_mode,
                                        threshold=cfg.threshold, seed=cfg.seed)
    else:  # fine-tune an exported artefact: its architecture wins over cfg.architecture
        networks, meta = load_recipe_artifact(cfg.init_from, lm, sentinel_mode=cfg.sentinel_mode, threshold=cfg.threshold)
        if meta["prefix_mode"] != cfg.prefix_mode:
            raise ConfigError(f"init_from {cfg.init_from} was trained with prefix_mode {meta['prefix_mode']!r}, "
                              f"the config asks for {cfg.prefix_mode!r}")
        log.info("starting from %s (%s steps)", cfg.init_from, meta.get("training", {}).get("steps", "?"))
    module = RecipeModule(lm, networks, prefix_mode=cfg.prefix_mode, weights=cfg.weights, lr=cfg.lr,
                          body_lr=cfg.body_lr, sentinel_lr=cfg.sentinel_lr, warmup_steps=cfg.warmup_steps,
                          statement_separator=cfg.statement_separator)
    data = RecipeDataModule(cfg.datasets, cfg.data_dir, cfg.batch_size, cfg.val_size, cfg.limit_per_dataset,
                            cfg.seed, cfg.num_workers, cases=cases, repeats=cfg.dataset_repeats)
    trainer = fit(cfg, module, fast_dev_run=fast_dev_run, resume=resume, progress=progress,
                  fit_kwargs={"datamodule": data})
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    artifact = Path(cfg.out)
    if trainer.is_global_zero:  # with several processes, one writes the artefact
        artifact = save_recipe_artifact(networks, lm, cfg.out, cfg.prefix_mode, statement_separator=cfg.statement_separator,
                                        extra={"steps": trainer.global_step, "datasets": list(cfg.datasets),
                                               "config": dataclasses.asdict(cfg), "last_metrics": metrics})
    return TrainResult(artifact, trainer.global_step, metrics)


def run_cli(argv: Sequence[str] | None, kind: str) -> int:
    """``python -m train.<kind> ARGS`` is ``recipe train <kind> ARGS`` (train.cli)."""
    from train.cli import main as train_main

    return train_main([kind, *(sys.argv[1:] if argv is None else argv)])


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(argv, "recipe")


if __name__ == "__main__":
    sys.exit(main())
