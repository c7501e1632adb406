"""What the prefix must carry: RECIPE prefixes with the right entry given (oracle retrieval).

    RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prefix_ablation.py \
        --checkpoint checkpoints/recipe-smollm2 [--checkpoint runs/older] --dataset zsre --n 300

Single edits, teacher-forced token accuracy of the new target after the edit prompt (reliability) and
its paraphrases (generality), split into targets seen / never seen as a new target in training
(benchmarks/seen_split.py). Retrieval is taken out of the picture: each query gets its own edit's
prefix. Variants:

- ``none``: the unedited model;
- ``statement``: the LM's own token embeddings of ``prompt + " " + target_new`` (no training at all),
  with and without a "\\n" after it;
- per checkpoint: ``vectors``: its l learned vectors alone; ``vectors+statement``: vectors then the
  statement, with the separator the checkpoint was trained with and with the other one.

A checkpoint trained with ``prefix_mode: vectors+statement`` never saw its vectors alone, so its
``vectors`` row says what the vectors carry, not what a ``vectors``-trained model would reach
(FIELD_NOTES' calibration has that: ~0.02 on never-seen targets).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.seen_split import training_targets  # noqa: E402
from recipe.data import load_dataset  # noqa: E402
from recipe.editors.recipe import build_prefix, load_artifact, statement_token_ids  # noqa: E402
from recipe.lm import EditedLM  # noqa: E402
from recipe.models import load_model  # noqa: E402


def _variants(lm: EditedLM, checkpoints: list[str]):
    emb = lm.model.get_input_embeddings()

    def statement(sep):
        return lambda r: emb(torch.tensor(statement_token_ids(lm, r.statement, sep), device=lm.device))

    out = {"none": lambda r: None, "statement": statement(""), "statement + \\n": statement("\n")}
    for path in checkpoints:
        nets, meta = load_artifact(path, lm)
        trained_sep = meta.get("statement_separator", "")
        name = Path(path).name

        def vectors(r, nets=nets):
            return nets.prompt_encoder(nets.encoder.encode_knowledge([r.statement]))[0]

        out[f"{name}: vectors"] = vectors
        for sep in dict.fromkeys([trained_sep, "\n" if trained_sep == "" else ""]):
            tag = "trained" if sep == trained_sep else "not trained"
            out[f"{name}: vectors+statement, sep {sep!r} ({tag})"] = (
                lambda r, v=vectors, s=sep: build_prefix(lm, v(r), statement_token_ids(lm, r.statement, s)))
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    lm = EditedLM(*load_model(args.model))
    cases = load_dataset(args.dataset, args.data_dir)
    random.Random(args.seed).shuffle(cases)
    cases = [c for c in cases if len(c.requests) == 1][:args.n]
    seen = training_targets(args.data_dir)
    is_seen = [c.requests[0].target_new.strip().casefold() in seen for c in cases]
    result = {"dataset": args.dataset, "n": len(cases), "seen": sum(is_seen), "seed": args.seed, "variants": {}}
    for name, make in _variants(lm, args.checkpoint).items():
        rel, gen = [], []
        with torch.no_grad():
            for c in cases:
                r = c.requests[0]
                probes = [(r.prompt, r.target_new)] + [(g.prompt, g.target) for g in c.generality]
                prefix = make(r)
                scores = lm.score([p for p, _ in probes], [t for _, t in probes], [prefix] * len(probes))
                rel.append(scores[0].accuracy)
                gen.append(sum(s.accuracy for s in scores[1:]) / max(1, len(scores) - 1) if len(scores) > 1 else None)
        row = {}
        for group, keep in (("all", lambda i: True), ("seen", lambda i: is_seen[i]),
                            ("never-seen", lambda i: not is_seen[i])):
            idx = [i for i in range(len(cases)) if keep(i)]
            g = [gen[i] for i in idx if gen[i] is not None]
            row[group] = {"reliability": sum(rel[i] for i in idx) / max(1, len(idx)),
                          "generality": sum(g) / max(1, len(g)), "cases": len(idx)}
        result["variants"][name] = row
        print(f"{name:60s} " + "  ".join(f"{k}: {v['reliability']:.3f}/{v['generality']:.3f}" for k, v in row.items()),
              flush=True)
    return result


def table(result: dict) -> str:
    lines = [f"{result['dataset']}, {result['n']} single edits (seed {result['seed']}), oracle retrieval, "
             f"teacher-forced reliability / generality; {result['seen']} seen, {result['n'] - result['seen']} never-seen targets",
             "", "| prefix | all | seen | never seen |", "|---|---|---|---|"]
    for name, row in result["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[g]['reliability']:.3f} / {row[g]['generality']:.3f}"
                                                 for g in ("all", "seen", "never-seen")) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", default=[], help="RECIPE artefact folder (repeatable)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="zsre")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "prefix_ablation")
    args = p.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.dataset}.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (args.out / f"{args.dataset}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
