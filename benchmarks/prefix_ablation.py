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

Generality is also given per probe group (RippleEdits: rephrase, Subject_Aliasing,
Logical_Generalization, Reasoning). For RippleEdits' two-hop Reasoning probes, ``second_hop_direct``
asks the unedited model the second hop about the new answer directly (see :func:`second_hop`): a bound
on those probes for any editor that writes only the edited fact into this LM.

A checkpoint trained with ``prefix_mode: vectors+statement`` never saw its vectors alone, so its
``vectors`` row says what the vectors carry, not what a ``vectors``-trained model would reach
(FIELD_NOTES' calibration has that: ~0.02 on never-seen targets).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.seen_split import mean_known, training_targets  # noqa: E402
from recipe.data import load_dataset  # noqa: E402
from recipe.artifacts import load_recipe_artifact as load_artifact  # noqa: E402
from recipe.editors.recipe import edit_prefix  # noqa: E402
from recipe.lm import EditedLM, Prefix  # noqa: E402
from recipe.models import load_model  # noqa: E402
from recipe.retrieval.statements import statement_token_ids  # noqa: E402


def _variants(lm: EditedLM, checkpoints: list[str]):
    def statement(sep):
        return lambda r: Prefix(token_ids=statement_token_ids(lm, r.statement, sep))

    out = {"none": lambda r: None, "statement": statement(""), "statement + \\n": statement("\n")}
    for path in checkpoints:
        nets, meta = load_artifact(path, lm)
        trained_sep = meta.get("statement_separator", "")
        name = Path(path).name

        def vectors(r, nets=nets):
            return nets.prompt_encoder(nets.encoder.encode_knowledge([r.statement]))[0]

        out[f"{name}: vectors"] = lambda r, v=vectors: Prefix(v(r))
        for sep in dict.fromkeys([trained_sep, "\n" if trained_sep == "" else ""]):
            tag = "trained" if sep == trained_sep else "not trained"
            out[f"{name}: vectors+statement, sep {sep!r} ({tag})"] = (
                lambda r, v=vectors, s=sep: edit_prefix(v(r), statement_token_ids(lm, r.statement, s)))
    return out


def second_hop(request, probe) -> str | None:
    """A RippleEdits Reasoning probe asked about the new answer directly, or None when its wording does
    not contain the edit's phrase: "The official language of the place of death of Leo Arons is" with
    the edit "The place of death of Leo Arons is" -> "Berlin" becomes "The official language of Berlin is"
    (a leading "The name of" of the edit prompt may be missing in the probe).
    What the unedited model answers there bounds what any editor that writes only the edited fact
    (RECIPE's prefix, a weight edit) can reach on the two-hop probe with this LM."""
    phrase = re.sub(r"\s+(is|was|are|were)$", "", request.prompt.strip())
    for candidate in (phrase, re.sub(r"^the name of\s+", "", phrase, flags=re.IGNORECASE)):
        at = probe.prompt.lower().find(candidate.lower()) if candidate else -1
        if at >= 0:
            return probe.prompt[:at] + request.target_new.strip() + probe.prompt[at + len(candidate):]
    return None


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    lm = EditedLM(*load_model(args.model))
    cases = load_dataset(args.dataset, args.data_dir)
    random.Random(args.seed).shuffle(cases)
    cases = [c for c in cases if len(c.requests) == 1][:args.n]
    seen = training_targets(args.data_dir)
    is_seen = [c.requests[0].target_new.strip().casefold() in seen for c in cases]
    splits = {"all": list(range(len(cases))), "seen": [i for i, x in enumerate(is_seen) if x],
              "never-seen": [i for i, x in enumerate(is_seen) if not x]}  # case indices
    result = {"dataset": args.dataset, "n": len(cases), "seen": sum(is_seen), "seed": args.seed, "variants": {}}
    groups = sorted({g.group for c in cases for g in c.generality})
    for name, make in tqdm(_variants(lm, args.checkpoint).items(), desc="variants"):
        rel, gen, by_group = [], [], []  # per case; by_group: {group: mean accuracy of its probes}
        with torch.no_grad():
            for c in cases:
                r = c.requests[0]
                probes = [(r.prompt, r.target_new)] + [(g.prompt, g.target) for g in c.generality]
                prefix = make(r)
                scores = lm.score([p for p, _ in probes], [t for _, t in probes], [prefix] * len(probes))
                rel.append(scores[0].accuracy)
                gen.append(mean_known([s.accuracy for s in scores[1:]]))
                per: dict[str, list[float]] = {}
                for g, s in zip(c.generality, scores[1:]):
                    per.setdefault(g.group, []).append(s.accuracy)
                by_group.append({k: mean_known(v) for k, v in per.items()})
        result["variants"][name] = {
            split: {"reliability": mean_known([rel[i] for i in idx]), "generality": mean_known([gen[i] for i in idx]),
                    "cases": len(idx), "groups": {g: mean_known([by_group[i].get(g) for i in idx]) for g in groups}}
            for split, idx in splits.items()}
        print(f"{name:60s} " + "  ".join(f"{k}: {_fmt(v['reliability'])}/{_fmt(v['generality'])}"
                                          for k, v in result["variants"][name].items()), flush=True)
    hops = [[(second_hop(c.requests[0], g), g.target) for g in c.generality if g.group == "Reasoning"] for c in cases]
    if any(hops):
        result["second_hop_direct"] = _second_hop(lm, hops, splits)
    return result


def _second_hop(lm, hops, splits) -> dict:
    """The unedited model on the Reasoning probes rewritten to ask about the new answer directly
    (``hops``: per case, (rewritten prompt or None, target) pairs), scored in one call."""
    asked = [(n, p, t) for n, case_hops in enumerate(hops) for p, t in case_hops if p is not None]
    with torch.no_grad():
        scores = lm.score([p for _, p, _ in asked], [t for _, _, t in asked])
    per_case: list[list[float]] = [[] for _ in hops]
    for (n, _, _), s in zip(asked, scores):
        per_case[n].append(s.accuracy)
    acc = [mean_known(a) for a in per_case]
    out = {"probes": sum(len(h) for h in hops), "rewritten": len(asked)}
    return {**out, **{split: mean_known([acc[i] for i in idx]) for split, idx in splits.items()}}


def table(result: dict) -> str:
    lines = [f"{result['dataset']}, {result['n']} single edits (seed {result['seed']}), oracle retrieval, "
             f"teacher-forced reliability / generality; {result['seen']} seen, {result['n'] - result['seen']} never-seen targets",
             "", "| prefix | all | seen | never seen |", "|---|---|---|---|"]
    for name, row in result["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{_fmt(row[g]['reliability'])} / {_fmt(row[g]['generality'])}"
                                                 for g in ("all", "seen", "never-seen")) + " |")
    groups = sorted({k for row in result["variants"].values() for k in row["all"]["groups"]})
    if len(groups) > 1:
        lines += ["", "Generality by probe group, never-seen targets:", "",
                  "| prefix | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, row in result["variants"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row["never-seen"]["groups"][g]) for g in groups) + " |")
    if "second_hop_direct" in result:
        h = result["second_hop_direct"]
        lines += ["", f"Reasoning probes asked about the new answer directly, unedited model ({h['rewritten']} of "
                      f"{h['probes']} probes could be rewritten): all {_fmt(h['all'])}, seen {_fmt(h['seen'])}, "
                      f"never-seen {_fmt(h['never-seen'])}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", default=[], help="RECIPE artefact folder (repeatable)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="zsre")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "prefix_ablation")
    return p


def main(argv=None) -> int:
    p = build_parser()
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
