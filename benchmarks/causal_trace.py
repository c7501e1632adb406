"""Causal tracing over CounterFact (ROME §2, Fig. 2): which layer's MLP carries a fact at the subject's last token?

    RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/causal_trace.py \
        --model smollm2-135m --n 20 [--n-samples 10] [--window 1]

Facts are (prompt, subject, target_true) of the ``counterfact`` edit split's requests: what the
unedited model should already know, not the counterfactual ``target_new``. ``--screen`` records
(200) are drawn with ``--seed``; those whose subject occurs in the prompt are scored by the clean
probability of target_true's first token, and the ``--n`` with the highest are kept (ROME traces
facts the model predicts), so the set leans to the facts this model knows best.

For every kept fact :func:`recipe.locate.layer_effects` restores one state at a time at the
subject's last token (residual stream, MLP output, attention output; MLP/attention over ``--window``
layers centred on the layer) and reports the indirect effect ``p_restored − p_corrupt``. Written to
``benchmarks/results/causal_trace/<model>/``: ``effects_w<window>.json`` (per-fact and average
effects, wall times, command), ``layers_w<window>.png`` (average indirect effect vs layer per kind,
the configured ROME layer dashed) and ``trace_w<window>.png`` (a full ROME Fig. 1-style trace of the
best-known fact). Prints the layer with the largest MLP effect beside the configured ROME layer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recipe import locate  # noqa: E402
from recipe.data import load_dataset  # noqa: E402
from recipe.lm import EditedLM  # noqa: E402
from recipe.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"residual": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}


@torch.no_grad()
def known_facts(lm: EditedLM, cases, n: int, screen: int, seed: int) -> list[dict]:
    """The ``n`` of ``screen`` seeded records whose true target's first token is most probable."""
    scored = []
    for i in random.Random(seed).sample(range(len(cases)), min(screen, len(cases))):
        request = cases[i].requests[0]
        if not request.subject or request.subject not in request.prompt or not request.target_true:
            continue
        ids = torch.tensor([lm.prompt_ids(request.prompt)], device=lm.device)  # (1, T)
        logits = lm.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()  # (V,)
        p_clean = torch.softmax(logits, -1)[lm.target_ids(request.target_true)[0]].item()
        scored.append({"case_id": cases[i].case_id, "prompt": request.prompt, "subject": request.subject,
                       "target": request.target_true, "p_clean": p_clean})
    return sorted(scored, key=lambda f: -f["p_clean"])[:n]


def plot_layers(effects: locate.LayerEffects, rome_layer: int | None, title: str, path: Path) -> Path:
    """Average indirect effect (± standard error over facts) vs layer, one line per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, rows in effects.effects.items():
        mean = rows.mean(0)  # (L,)
        sem = rows.std(0, ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else np.zeros_like(mean)
        layers = np.arange(len(mean))
        label = kind if kind == "residual" or effects.window == 1 else f"{kind} (window {effects.window})"
        ax.plot(layers, mean, marker="o", ms=3, color=COLOURS[kind], label=label)
        ax.fill_between(layers, mean - sem, mean + sem, color=COLOURS[kind], alpha=0.15)
    if rome_layer is not None:
        ax.axvline(rome_layer, color="grey", ls="--", lw=1, label=f"configured ROME layer ({rome_layer})")
    ax.set_xlabel("layer")
    ax.set_ylabel("average indirect effect (p restored − p corrupt)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(effects: locate.LayerEffects, rome_layer: int | None) -> dict:
    out = {}
    for kind in effects.effects:
        avg = effects.average(kind)
        best, later = int(np.argmax(avg)), 1 + int(np.argmax(avg[1:]))  # layer 0's MLP often acts as an embedding
        out[kind] = {"best_layer": best, "best_aie": round(float(avg[best]), 4),
                     "best_layer_from_1": later, "best_aie_from_1": round(float(avg[later]), 4),
                     "aie_at_rome_layer": None if rome_layer is None else round(float(avg[rome_layer]), 4)}
    return out


def command(args) -> str:
    return ("RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/causal_trace.py "
            f"--model {args.model} --n {args.n} --n-samples {args.n_samples} --window {args.window} "
            f"--kinds {' '.join(args.kinds)} --screen {args.screen} --seed {args.seed}"
            + ("" if args.heatmap else " --no-heatmap"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m or a HF id")
    p.add_argument("--n", type=int, default=20, help="facts to trace (the best known of --screen)")
    p.add_argument("--screen", type=int, default=200, help="seeded CounterFact records scored by p_clean")
    p.add_argument("--n-samples", type=int, default=10, help="noise draws per fact (ROME: 10)")
    p.add_argument("--noise-factor", type=float, default=3.0, help="ν: noise = ν·σ·N(0, I) (ROME: 3)")
    p.add_argument("--window", type=int, default=1, help="MLP/attention layers restored together (ROME's figures: 10)")
    p.add_argument("--kinds", nargs="+", choices=locate.KINDS, default=list(locate.KINDS),
                   help="states to restore (the residual stream ignores --window)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heatmap", action=argparse.BooleanOptionalAction, default=True,
                   help="also write a full (layers × tokens) trace of the best-known fact")
    p.add_argument("--data", default=None, help="data dir (default: $RECIPE_DATA_DIR)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/causal_trace/<model>")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "causal_trace" / args.model
    wall = {}

    start = time.perf_counter()
    model, tokenizer, spec = load_model(args.model)
    lm = EditedLM(model, tokenizer, spec)
    rome_layer = spec.edit_layers.get("rome")
    wall["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    facts = known_facts(lm, load_dataset("counterfact", args.data), args.n, args.screen, args.seed)
    wall["screen_s"] = time.perf_counter() - start

    start = time.perf_counter()
    effects = locate.layer_effects(lm, [(f["prompt"], f["subject"], f["target"]) for f in facts],
                                   n_samples=args.n_samples, noise_factor=args.noise_factor, seed=args.seed,
                                   kinds=args.kinds, window=args.window)
    wall["layer_effects_s"] = time.perf_counter() - start
    for i, f in enumerate(facts):
        f["p_corrupt"] = float(effects.p_corrupt[i])
        f["effects"] = {kind: [round(float(x), 5) for x in rows[i]] for kind, rows in effects.effects.items()}

    tag = f"w{args.window}"
    title = (f"{args.model}: average indirect effect at the subject's last token\n"
             f"{len(facts)} CounterFact facts, {args.n_samples} noise samples, ± standard error")
    plot_layers(effects, rome_layer, title, out / f"layers_{tag}.png")
    if args.heatmap:
        start = time.perf_counter()
        best = facts[0]
        result = locate.trace(lm, best["prompt"], best["subject"], best["target"], n_samples=args.n_samples,
                              noise_factor=args.noise_factor, seed=args.seed, kinds=args.kinds, window=args.window)
        locate.plot_trace(result, out / f"trace_{tag}.png")
        wall["trace_s"] = time.perf_counter() - start

    report = {
        "model": args.model, "configured_rome_layer": rome_layer, "n_layers": model.config.num_hidden_layers,
        "n_facts": len(facts), "screened": args.screen, "n_samples": args.n_samples,
        "noise_factor": args.noise_factor, "noise_sigma": locate.embedding_std(lm), "window": args.window,
        "token": effects.token, "seed": args.seed,
        "summary": summary(effects, rome_layer),
        "average": {kind: [round(float(x), 5) for x in effects.average(kind)] for kind in effects.effects},
        "mean_p_clean": float(effects.p_clean.mean()), "mean_p_corrupt": float(effects.p_corrupt.mean()),
        "wall_s": {k: round(v, 1) for k, v in wall.items()}, "torch_threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(), "command": command(args), "facts": facts,
    }
    (out / f"effects_{tag}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    mlp = report["summary"]["mlp"]
    sys.stdout.write(f"{args.model}: largest MLP indirect effect at the subject's last token: layer "
                     f"{mlp['best_layer']} (AIE {mlp['best_aie']:.4f}), from layer 1 on: {mlp['best_layer_from_1']} "
                     f"(AIE {mlp['best_aie_from_1']:.4f}); configured ROME layer {rome_layer} "
                     f"(AIE {mlp['aie_at_rome_layer']}); {len(facts)} facts, {args.n_samples} samples, "
                     f"window {args.window}, {wall['layer_effects_s']:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
