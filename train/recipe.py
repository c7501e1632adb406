"""Train RECIPE's retriever, prompt encoder and sentinel against a frozen LM, then export the artefact.

    python -m train.recipe --config configs/train/recipe.yaml [--max-steps N] [--fast-dev-run]
        [--wandb online|offline|disabled] [--out checkpoints/recipe-smollm2] [--run-dir runs/recipe-smollm2]
        [--val-every N]
        [--data-dir PATH] [--precision bf16-mixed|32-true] [--accelerator cpu|gpu] [--devices N]

Lightning checkpoints go to ``<run_dir>/checkpoints/last.ckpt`` (every ``val_every`` steps and at the
end); a run whose ``last.ckpt`` exists resumes from it (``--no-resume`` starts afresh). Weights &
Biases logs offline by default (``--wandb``, else ``$WANDB_MODE``, else the config). At the end the
trained networks are exported (fp16 safetensors + ``recipe.json``) to ``out``: the folder that
``configs/editors/recipe.yaml``'s ``checkpoint`` loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from recipe.config import load_config
from recipe.errors import ConfigError, RecipeError
from recipe.artifacts import DEFAULT_SEPARATOR, load_recipe_artifact, save_recipe_artifact
from recipe.editors.recipe import PrefixMode, RecipeNetworks
from recipe.lm import EditedLM
from recipe.retrieval.encoders import RecipeArchitecture
from recipe.retrieval.sentinel import SentinelMode
from recipe.types import EditCase
from train.config import Precision, TrainConfig
from train.data import RecipeDataModule
from train.module import LossWeights, RecipeModule

log = logging.getLogger("train.recipe")


@dataclass(kw_only=True)
class RecipeTrainConfig(TrainConfig):
    """RECIPE's trainer; the shared settings are documented in train.config.TrainConfig."""

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
    run_dir: str = "runs/recipe-smollm2"
    out: str = "checkpoints/recipe-smollm2"


@dataclass
class TrainResult:
    artifact: Path
    global_step: int
    metrics: dict[str, float]  # the last logged value of every metric


def load_lm(name: str) -> EditedLM:
    from recipe.models import load_model

    model, tokenizer, spec = load_model(name)
    return EditedLM(model, tokenizer, spec)


def _step_timer(every: int = 10):
    """A callback that logs the wall time of every training batch (``train/step_s``, validation excluded)
    and, every ``every`` steps, one progress line (step, s/step, loss terms) to the ``train.recipe``
    logger, so a background run's log shows where it is even when the progress bar is buffered."""
    import time

    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t0)
            pl_module.log("train/step_s", self.times[-1], batch_size=len(batch))
            step = trainer.global_step
            if every and step % every == 0:
                m = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items()
                     if k.startswith("train/") and k != "train/step_s"}
                recent = self.times[-every:]
                log.info("step %d/%d  %.2f s/step  %s", step, trainer.max_steps, sum(recent) / len(recent),
                         "  ".join(f"{k} {v:.3f}" for k, v in sorted(m.items())))

        def on_train_end(self, trainer, pl_module):
            if self.times:
                log.info("%.2f s/step (mean of %d training steps, validation excluded)",
                         sum(self.times) / len(self.times), len(self.times))

    return StepTimer()


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
    callbacks = [_step_timer(cfg.log_every)] + ([] if fast_dev_run else [
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
    artifact = save_recipe_artifact(networks, lm, cfg.out, cfg.prefix_mode, statement_separator=cfg.statement_separator,
                                    extra={"steps": trainer.global_step, "datasets": list(cfg.datasets),
                                           "config": dataclasses.asdict(cfg), "last_metrics": metrics})
    return TrainResult(artifact, trainer.global_step, metrics)


def run_cli(argv: Sequence[str] | None, *, prog: str, doc: str, config_cls: type, default_config: str,
            train_fn: Callable) -> int:
    """The command line shared by ``train.recipe`` and ``train.mend``: flags override the YAML config."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--config", default=default_config, help=f"{config_cls.__name__} YAML (checked strictly)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--val-every", type=int, help="steps between validations and last.ckpt saves")
    p.add_argument("--fast-dev-run", action="store_true", help="one train and one validation batch, no logging")
    p.add_argument("--wandb", choices=["online", "offline", "disabled"], help="default: $WANDB_MODE, else the config")
    p.add_argument("--out", help="where the exported artefact goes")
    p.add_argument("--run-dir", help="Lightning checkpoints and W&B files")
    p.add_argument("--data-dir", help="dataset folder (default: $RECIPE_DATA_DIR)")
    p.add_argument("--limit-per-dataset", type=int)
    p.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed"])
    p.add_argument("--accelerator")
    p.add_argument("--devices", type=lambda v: int(v) if v.isdigit() else v)
    p.add_argument("--strategy")
    p.add_argument("--init-from", help="exported artefact folder to start from (default: the config's init_from)")
    p.add_argument("--no-resume", action="store_true", help="ignore <run_dir>/checkpoints/last.ckpt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    wandb = args.wandb or os.environ.get("WANDB_MODE")
    if wandb == "dryrun":
        wandb = "offline"
    overrides = {"max_steps": args.max_steps, "val_every": args.val_every, "wandb": wandb, "out": args.out,
                 "run_dir": args.run_dir, "data_dir": args.data_dir, "limit_per_dataset": args.limit_per_dataset,
                 "precision": args.precision, "accelerator": args.accelerator, "devices": args.devices,
                 "strategy": args.strategy, "init_from": args.init_from}
    cfg = load_config(config_cls, args.config, **overrides)
    result = train_fn(cfg, fast_dev_run=args.fast_dev_run, resume=not args.no_resume)
    log.info("exported %s after %d steps", result.artifact, result.global_step)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(argv, prog="python -m train.recipe", doc=__doc__, config_cls=RecipeTrainConfig,
                   default_config="configs/train/recipe.yaml", train_fn=train)


if __name__ == "__main__":
    sys.exit(main())
