"""`recipe` command line: demo (the main job), eval (the sequential-edit benchmark), general, mquake, serve /
edit / generate (recipe/serve/), list."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

from recipe.errors import RecipeError

log = logging.getLogger("recipe")


def parse_overrides(pairs: list[str]) -> dict:
    """``--set steps=10 --set lr=1e-3`` -> {"steps": 10, "lr": 0.001} (values parsed as YAML)."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers >= 1, e.g. ``1,10,100``."""
    values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return values


def _count_or_all(text: str) -> int | None:
    return None if text.strip().lower() == "all" else positive_int(text)


def _count_or_zero(text: str) -> int:
    """argparse type: a whole number >= 0 (0: off)."""
    return 0 if text.strip() == "0" else positive_int(text)


def default_device() -> str:
    """A GPU when torch sees one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(args):
    from recipe.editors import load_editor
    from recipe.editors.base import editor_config
    from recipe.lm import EditedLM
    from recipe.models import get_spec, load_model

    config = editor_config(args.editor, args.config, **parse_overrides(args.set))  # fail before the model loads
    get_spec(args.model)
    if getattr(args, "data_dir", None):  # where the editors find their own text (ROME/MEMIT: WikiText)
        from recipe.data.registry import DATA_DIR_ENV

        os.environ[DATA_DIR_ENV] = args.data_dir
    model, tokenizer, spec = load_model(args.model, device=args.device or default_device())
    lm = EditedLM(model, tokenizer, spec, max_batch=args.batch_size)
    editor = load_editor(args.editor, lm, config)
    return lm, editor


def _wrap(text: str, width: int = 44) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder="…")


def cmd_demo(args) -> int:
    from recipe.data import load_dataset

    lm, editor = _load(args)
    cases = load_dataset("demo")[: args.edits]
    rows = []  # (kind, prompt, expected)
    for c in cases:
        r = c.request
        rows.append(("edit", r.prompt, r.target_new))
        rows += [("paraphrase", p.prompt, p.target) for p in c.generality[:1]]
        rows += [("unrelated", p.prompt, p.target) for p in c.locality[:1]]
    prompts = [p for _, p, _ in rows]
    before = lm.generate(prompts, max_new_tokens=args.max_new_tokens)
    print(f"Applying {len(cases)} edits one after another with editor {editor.name!r} on {lm.spec.name} ...")
    from tqdm.auto import tqdm

    for c in tqdm(cases, desc="editing"):
        editor.edit(c.requests)
    after = lm.generate(prompts, max_new_tokens=args.max_new_tokens)
    print(f"\n{'kind':<10} | {'prompt':<44} | {'wanted':<14} | {'before':<30} | after")
    print("-" * 140)
    for (kind, prompt, want), b, a in zip(rows, before, after):
        print(f"{kind:<10} | {_wrap(prompt):<44} | {_wrap(want, 14):<14} | {_wrap(b, 30):<30} | {_wrap(a, 30)}")
    from recipe.eval.metrics import exact_match

    for kind in ("edit", "paraphrase", "unrelated"):
        idx = [i for i, r in enumerate(rows) if r[0] == kind]
        if kind == "unrelated":
            same = sum(before[i] == after[i] for i in idx)
            print(f"{kind}: {same}/{len(idx)} continuations unchanged by the edits")
        else:
            hits = sum(exact_match(after[i], [rows[i][2]]) for i in idx)
            was = sum(exact_match(before[i], [rows[i][2]]) for i in idx)
            print(f"{kind}: new answer generated for {hits}/{len(idx)} prompts (before editing: {was}/{len(idx)})")
    editor.rollback()
    return 0


def cmd_eval(args) -> int:
    from recipe.data import load_dataset
    from recipe.eval.report import format_table, plot_metrics
    from recipe.eval.sequential import run_sequential

    cases = load_dataset(args.dataset, args.data_dir)
    lm, editor = _load(args)
    out = Path(args.out or f"runs/{args.editor}-{_dataset_slug(args.dataset)}-{lm.spec.name.replace('/', '_')}")
    result = run_sequential(lm, editor, cases, args.edits, n_cases=args.cases, seed=args.seed,
                            free_generation=not args.no_generation, natural_stop=args.natural_stop, out_dir=out, resume=args.resume,
                            score_cases=args.score_cases, checkpoint_every=args.checkpoint_every,
                            save_states=args.save_states, identity={"dataset": args.dataset})
    summaries = list(result.summaries.values())
    title = f"{args.editor} on {args.dataset} ({lm.spec.name}, seed {args.seed})"
    table = format_table(summaries, title)
    if args.natural_stop:
        table += "\n\nnatural stop (ns): " + "; ".join(
            f"T={s['T']}: " + ", ".join(f"{k} {v:.3f}" for k, v in s["ns"].items() if "/" not in k) for s in summaries)
    (out / "table.txt").write_text(table + "\n")
    (out / "run.json").write_text(json.dumps({"argv": args.argv, "editor_config": editor.state_dict()["config"]},
                                             indent=1, default=str))
    plot_metrics(summaries, out / "metrics.png", title)
    print(table)
    print(f"\nresults: {out}/ (summary.json, T*.jsonl per case, table.txt, metrics.png)")
    return 0


def _dataset_slug(dataset: str) -> str:
    """A registered name as it is; a file by its name without suffixes (``my-edits.json`` -> ``my-edits``)."""
    return Path(dataset).name.split(".")[0] or dataset


def cmd_general(args) -> int:
    from recipe.data import load_dataset
    from recipe.editors.state_file import load_state
    from recipe.eval.general import format_general, load_general, run_general

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    items = load_general(args.data_dir, sets, args.n, args.seed)  # missing files fail before the model loads
    agreement = load_general(args.data_dir, sets, args.agreement, args.seed) if args.agreement else None
    cases = load_dataset(args.dataset, args.data_dir)
    lm, editor = _load(args)
    out = Path(args.out or f"runs/general-{args.editor}-{args.dataset}-{lm.spec.name.replace('/', '_')}")
    states = [load_state(p) for p in args.editor_state]
    result = run_general(lm, editor, cases, args.edits, items, seed=args.seed, max_tokens=args.max_tokens, out_dir=out,
                         states=states, agreement_items=agreement, top_k=args.top_k)
    (out / "run.json").write_text(json.dumps({"argv": args.argv, "dataset": args.dataset, "n": args.n,
                                              "editor_states": args.editor_state,
                                              "editor_config": editor.state_dict()["config"]}, indent=1, default=str))
    print(format_general(result))
    print(f"\nresults: {out}/ (general.json, general.txt, general.png)")
    return 0


def cmd_mquake(args) -> int:
    from recipe.data import load_dataset
    from recipe.eval.mquake import MquakePrompts, format_mquake, run_mquake

    prompts = MquakePrompts.load(args.data_dir, args.demos)  # missing files fail before the model loads
    cases = load_dataset(args.dataset, args.data_dir)
    lm, editor = _load(args)
    out = Path(args.out or f"runs/mquake-{args.editor}-{args.dataset}-{lm.spec.name.replace('/', '_')}")
    result = run_mquake(lm, editor, cases, prompts, n_cases=args.cases, seed=args.seed,
                        all_at_once=args.all_edits, mello=args.mello, out_dir=out)
    (out / "run.json").write_text(json.dumps({"argv": args.argv, "editor_config": editor.state_dict()["config"]},
                                             indent=1, default=str))
    print(format_mquake(result))
    print(f"\nresults: {out}/ (mquake.json: scores, and what the model answered per case)")
    return 0


def cmd_list(args) -> int:
    from recipe.data import DATASETS
    from recipe.data.registry import DATA_DIR_ENV, dataset_present
    from recipe.editors import EDITORS
    from recipe.models import known_models

    print("models:   ", ", ".join(known_models()), "(or any Hugging Face id / local folder)")
    print("editors:  ", ", ".join(sorted(EDITORS)))
    where = args.data_dir or os.environ.get(DATA_DIR_ENV)
    print(f"datasets ([x] present in the data folder {where or f'(none: --data-dir or ${DATA_DIR_ENV})'}):")
    for name, spec in sorted(DATASETS.items()):
        print(f"  [{'x' if dataset_present(name, args.data_dir) else ' '}] {name:<22} {spec.description}")
    print("  or the path of your own JSON file in a supported format (recipe.data.formats)")
    return 0


def cmd_train(args) -> int:
    from train.cli import main as train_main

    return train_main(args.train_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recipe",
        description="Lifelong knowledge editing: apply thousands of edits one after another and measure "
                    "reliability, generality and locality.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, editor_default):
        p.add_argument("--model", default="smollm2-135m",
                       help="registered model (see `recipe list`), Hugging Face id or local folder (default: %(default)s)")
        p.add_argument("--editor", default=editor_default, help="editor name (default: %(default)s)")
        p.add_argument("--config", default=None,
                       help="editor config YAML (default: configs/editors/<editor>.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one editor config key, e.g. --set steps=20 (repeatable)")
        p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass (default: %(default)s)")
        p.add_argument("--device", default=None,
                       help="torch device of the model, e.g. cpu, cuda, cuda:1, mps (default: a GPU when torch sees one, else cpu)")

    demo = sub.add_parser("demo", help="edit the bundled model with the built-in demo facts and show "
                                       "generate() before/after for edit prompts, paraphrases and unrelated prompts")
    common(demo, "recipe")
    demo.add_argument("--edits", type=positive_int, default=8, help="how many demo edits to apply (default: %(default)s)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=8, help="tokens generated per prompt (default: %(default)s)")
    demo.add_argument("--data-dir", default=None, help="data folder; ROME/MEMIT/AlphaEdit read WikiText there for "
                                                       "their key statistics (default: $RECIPE_DATA_DIR)")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="sequential-edit evaluation: T edits one at a time, then score all T",
                        description="Seeded shuffle -> record the unedited model on locality probes -> apply T "
                                    "edits one at a time -> score all T (teacher-forced and greedy exact match) "
                                    "-> roll back; for each T.")
    common(ev, "ft")
    ev.add_argument("--dataset", required=True, help="dataset name (see `recipe list`) or the path of your own "
                                                     "JSON file (zsRE, CounterFact, KnowEdit, RippleEdits or MQuAKE layout)")
    ev.add_argument("--edits", type=positive_ints, default="1,10,100", help="comma-separated T values (default: %(default)s)")
    ev.add_argument("--cases", type=positive_int, default=None,
                    help="cases scored per T, cut into rounds of T edits (default: the largest T); "
                         "e.g. --edits 1 --cases 100 = 100 single-edit rounds")
    ev.add_argument("--seed", type=int, default=0, help="shuffle seed (default: %(default)s)")
    ev.add_argument("--data-dir", default=None, help="dataset folder (default: $RECIPE_DATA_DIR)")
    ev.add_argument("--out", default=None, help="output folder (default: runs/<editor>-<dataset>-<model>)")
    ev.add_argument("--resume", action="store_true",
                    help="keep the complete rounds already in the output folder and run only the rest; a round "
                         "continues from its last checkpoint, or from the state --save-states kept; a folder of "
                         "another run (editor, config, dataset, seed, model, cases) is refused")
    ev.add_argument("--no-generation", action="store_true", help="skip free-generation exact match (faster)")
    ev.add_argument("--natural-stop", action="store_true",
                    help="also score natural-stop generation (summary.json key 'ns'): greedy until EOS or the end "
                         "of the first sentence, at most 32 tokens; a hit when the new answer is in that sentence "
                         "and the old one is not; locality: the unedited model's sentence (off by default)")
    ev.add_argument("--score-cases", type=positive_int, help="apply every edit of a round but score only a seeded sample "
                    "of this many of its cases (large sets on a CPU)")
    ev.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                    help="save the editor's state every N edits inside a round, so that --resume continues a "
                         "round cut short (slow editors: ROME, MEMIT, T-Patcher)")
    ev.add_argument("--save-states", action="store_true",
                    help="keep the editor's state after the first T cases as <out>/state-T<T> "
                         "(for `recipe general --editor-state`)")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("general", help="general ability (MMLU, CSQA, ANLI, SQuAD 2.0, WikiText) before and "
                                         "after T sequential edits",
                         description="Seeded subsets of each set -> score the unedited model -> apply the first T "
                                     "cases of the `recipe eval` shuffle one at a time -> score again, for each T "
                                     "(edits accumulate) -> roll back. See recipe/eval/general.py for the scoring.")
    common(gen, "recipe")
    gen.add_argument("--dataset", required=True, help="dataset the edits come from (see `recipe list`)")
    gen.add_argument("--edits", type=positive_ints, default="100,1000", help="comma-separated T values (default: %(default)s)")
    gen.add_argument("--n", type=_count_or_all, default=200,
                     help="items per set (ANLI: per round), or 'all'; each accuracy comes with a bootstrap 95%% "
                          "interval, about +-4 points at --n 500 (default: %(default)s)")
    gen.add_argument("--agreement", type=_count_or_zero, default=200, metavar="N",
                     help="agreement with the unedited model on the first N prompts of each set (ANLI: per round; "
                          "the default gives 1,400 prompts): the fraction whose greedy next token is unchanged and "
                          "the mean KL(unedited || edited); 0: off (default: %(default)s)")
    gen.add_argument("--top-k", type=positive_int, default=64,
                     help="tokens of the unedited next-token distribution kept for the KL, the rest pooled in one "
                          "bucket (a lower bound on the full KL) (default: %(default)s)")
    gen.add_argument("--sets", default="mmlu,csqa,anli,squad,wikitext", help="comma-separated (default: %(default)s)")
    gen.add_argument("--max-tokens", type=positive_int, default=512,
                     help="longest prompt + answer; longer contexts are cut (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0,
                     help="seed of the item subsets and of the edit order (default: %(default)s)")
    gen.add_argument("--data-dir", default=None, help="data folder holding general/, wikitext/ and the dataset "
                                                      "(default: $RECIPE_DATA_DIR)")
    gen.add_argument("--out", default=None, help="output folder (default: runs/general-<editor>-<dataset>-<model>)")
    gen.add_argument("--editor-state", action="append", default=[], metavar="DIR",
                     help="a state saved by `recipe eval --save-states` (same dataset and seed): loaded instead "
                          "of applying its T edits again (repeatable)")
    gen.set_defaults(func=cmd_general)

    mq = sub.add_parser("mquake", help="multi-hop questions after a chain of edits (MQuAKE): single-hop and "
                                       "multi-hop accuracy, optionally with MeLLo-style decomposition",
                        description="Floor: the unedited model's multi-hop accuracy on the original answers. Then "
                                    "each case's edits (all in one call) -> edit, single-hop and multi-hop accuracy "
                                    "on the new answers -> roll back. See recipe/eval/mquake.py.")
    common(mq, "recipe")
    mq.add_argument("--dataset", default="mquake-hard", help="an MQuAKE-layout dataset (default: %(default)s)")
    mq.add_argument("--cases", type=positive_int, default=None, help="a seeded subset of this many cases (default: all)")
    mq.add_argument("--seed", type=int, default=0, help="seed of the subset (default: %(default)s)")
    mq.add_argument("--all-edits", action="store_true",
                    help="apply the edits of every chosen case, case after case, then score (lifelong editors)")
    mq.add_argument("--mello", action="store_true", help="also score MeLLo-style decomposition (slower)")
    mq.add_argument("--demos", type=positive_int, default=None,
                    help="few-shot examples kept from each prompt file (default: all)")
    mq.add_argument("--data-dir", default=None, help="data folder holding mquake/ (default: $RECIPE_DATA_DIR)")
    mq.add_argument("--out", default=None, help="output folder (default: runs/mquake-<editor>-<dataset>-<model>)")
    mq.set_defaults(func=cmd_mquake)

    from recipe.serve.commands import add_parsers

    add_parsers(sub, common)
    ls = sub.add_parser("list", help="list models, editors and datasets (marking those present in the data folder)")
    ls.add_argument("--data-dir", default=None, help="data folder (default: $RECIPE_DATA_DIR)")
    ls.set_defaults(func=cmd_list)

    tr = sub.add_parser("train", add_help=False, help="train RECIPE, MEND or the verifier for any model "
                                                      "(`recipe train recipe --help`)")
    tr.add_argument("train_args", nargs=argparse.REMAINDER)
    tr.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what run.json records: the command as given, also when called from Python
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("recipe").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        return args.func(args)
    except RecipeError as err:
        print(f"recipe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
