"""``recipe train recipe|mend|verifier``: every field of the trainer's config dataclass is a flag.

    recipe train recipe --model smollm2-135m --max-steps 500            # -> runs/recipe-smollm2-135m/export
    recipe train mend --model Qwen/Qwen2.5-0.5B --config mend --devices 2 --strategy ddp
    recipe train recipe --config recipe-finetune --print-config        # the full YAML, every field

Flags are the config fields (``--max-steps`` or ``--max_steps``; nested ones as ``--architecture.key-dim``);
``--config FILE`` reads a YAML (a path, or the name of one in ``configs/train/``), and later flags override
it. The default config of each trainer is its shipped YAML (``configs/train/<kind>.yaml``). Outputs go to
``runs/<kind>-<model>/`` (Lightning checkpoints) and ``runs/<kind>-<model>/export`` (the artefact) under the
current folder unless ``--run-dir``/``--out`` say otherwise; an existing artefact is kept unless ``--force``.
After the first steps the log gives an estimate of the whole run's duration.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from recipe.config import configs_dir, load_config, repo_root
from recipe.errors import RecipeError

log = logging.getLogger("train")


class Trainer(NamedTuple):
    config_cls: type
    train: Callable
    help: str


def _trainers() -> dict[str, Trainer]:
    from train import mend, recipe, verifier

    return {"recipe": Trainer(recipe.RecipeTrainConfig, recipe.train,
                              "RECIPE's retriever, prompt encoder and sentinel against a frozen LM"),
            "mend": Trainer(mend.MENDTrainConfig, mend.train, "MEND's gradient transform against a frozen LM"),
            "verifier": Trainer(verifier.VerifierTrainConfig, verifier.train,
                                "the EditVerifier cross-encoder (independent of the LM)")}


def config_file(name: str) -> str:
    """``name`` as given when it is a file, else the YAML of that name in ``configs/train/``."""
    if Path(name).is_file():
        return name
    for candidate in (configs_dir() / "train" / name, configs_dir() / "train" / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    known = sorted(p.stem for p in (configs_dir() / "train").glob("*.yaml"))
    raise RecipeError(f"config {name!r} is neither a file nor one of configs/train/: {', '.join(known)}")


def _normalised(argv: Sequence[str]) -> list[str]:
    """``--max-steps 2`` -> ``--max_steps 2`` (fields are spelt with underscores); ``--config NAME`` resolved."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("-", "_").replace("__", "--", 1) + eq + value
            if name == "--config" and eq:
                arg = f"--config={config_file(value)}"
        elif i and argv[i - 1] == "--config":
            arg = config_file(arg)
        out.append(arg)
    return out


def _default_config(kind: str) -> list[str]:
    """``configs/train/<kind>.yaml`` when it sets anything (a file of comments only is no config)."""
    import yaml

    path = configs_dir() / "train" / f"{kind}.yaml"
    return [str(path)] if path.is_file() and yaml.safe_load(path.read_text()) else []


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="recipe train", description=__doc__.split("\n\n")[0], exit_on_error=False)
    subcommands = parser.add_subcommands(dest="kind", required=True)
    for kind, trainer in _trainers().items():
        sub = ArgumentParser(prog=f"recipe train {kind}", description=trainer.help, exit_on_error=False,
                             default_config_files=_default_config(kind))
        sub.add_argument("--config", action=ActionConfigFile, help="a YAML of config fields (path or configs/train/ name)")
        sub.add_class_arguments(trainer.config_cls, None)
        sub.add_argument("--force", action="store_true", help="overwrite an existing artefact at --out")
        sub.add_argument("--fast_dev_run", action="store_true", help="one train and one validation batch, no logging")
        sub.add_argument("--no_resume", action="store_true", help="ignore <run_dir>/checkpoints/last.ckpt")
        subcommands.add_subcommand(kind, sub, help=trainer.help)
    return parser


def check_output(out: str | Path, force: bool) -> None:
    """Refuse to train into a folder that already holds an artefact, unless ``force``."""
    path = Path(out)
    if path.is_dir() and any(path.iterdir()) and not force:
        raise RecipeError(f"{path} already holds an artefact; pass --force to overwrite it, or --out another folder")
    shipped = (repo_root() / "checkpoints").resolve()
    if shipped in (path.resolve(), *path.resolve().parents) and not force:
        raise RecipeError(f"{path} is inside the shipped checkpoints/ folder; pass --force to write there")


def parse(argv: Sequence[str]):
    """(kind, config dataclass, run options) of a ``recipe train`` command line."""
    parser = build_parser()
    try:
        args = parser.parse_args(_normalised(argv))
    except Exception as err:  # jsonargparse's ArgumentError; its message names the bad flag or value
        raise RecipeError(str(err)) from None
    kind = args.kind
    values = args[kind].as_dict()
    options = {k: values.pop(k) for k in ("force", "fast_dev_run", "no_resume")}
    values = {k: v for k, v in values.items() if k != "config" and not k.startswith("__")}  # jsonargparse's own
    if "--wandb" not in argv and not any(a.startswith("--wandb=") for a in argv) and os.environ.get("WANDB_MODE"):
        values["wandb"] = "offline" if os.environ["WANDB_MODE"] == "dryrun" else os.environ["WANDB_MODE"]
    cfg = load_config(_trainers()[kind].config_cls, values)
    return kind, cfg.resolved(), options


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("train").setLevel(logging.INFO)  # progress and the duration estimate, also under `recipe train`
    try:
        kind, cfg, options = parse(argv)
        check_output(cfg.out, options["force"])
    except RecipeError as err:
        print(f"recipe train: error: {err}", file=sys.stderr)
        return 2
    from lightning.pytorch.utilities.rank_zero import rank_zero_only  # with several processes, the first one speaks

    if rank_zero_only.rank == 0:
        log.info("training %s: checkpoints in %s, artefact to %s", kind, cfg.run_dir, cfg.out)
    result = _trainers()[kind].train(cfg, fast_dev_run=options["fast_dev_run"], resume=not options["no_resume"])
    if rank_zero_only.rank == 0:
        log.info("exported %s after %d steps", result.artifact, result.global_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
