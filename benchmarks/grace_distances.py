"""Where GRACE's keys lie: distances between MLP-output-projection inputs at a prompt's last token.

    RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grace_distances.py [--n 60] [--layers 5,10,...]

On zsRE *training* records (never the evaluation file): for each layer, the key norm and the
10/50/90% quantiles of the distance from an edit prompt's key to its paraphrase's, to the nearest
other edit prompt's key, and from a locality prompt to the nearest edit key. A radius that takes in
paraphrases but not other edits needs the first to be smaller than the second.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recipe.data import load_dataset  # noqa: E402
from recipe.lm import EditedLM  # noqa: E402
from recipe.models import load_model  # noqa: E402


def keys(lm: EditedLM, path: str, layers: list[int], prompts: list[str]) -> dict[int, torch.Tensor]:
    captured = {}
    hooks = [lm.module(path.format(layer)).register_forward_hook(
        lambda m, inp, out, layer=layer: captured.__setitem__(layer, inp[0][0, -1].detach())) for layer in layers]
    out = {layer: [] for layer in layers}
    try:
        for p in prompts:
            embeds, mask, pos = lm.embed([p], None)
            with torch.no_grad():
                lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1)
            for layer in layers:
                out[layer].append(captured[layer])
    finally:
        for h in hooks:
            h.remove()
    return {layer: torch.stack(v) for layer, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--layers", default="5,10,15,20,24,25,28")
    ap.add_argument("--data-dir", help="default: $RECIPE_DATA_DIR")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, spec = load_model(args.model)
    lm = EditedLM(model, tok, spec)
    cases = load_dataset("zsre-train", args.data_dir)
    random.Random(0).shuffle(cases)
    cases = [c for c in cases if c.generality and c.locality][:args.n]
    layers = [int(x) for x in args.layers.split(",")]
    kp, kg, kl = (keys(lm, spec.mlp_out, layers, ps) for ps in
                  ([c.requests[0].prompt for c in cases], [c.generality[0].prompt for c in cases],
                   [c.locality[0].prompt for c in cases]))
    q = torch.tensor([0.1, 0.5, 0.9])
    fmt = lambda x: " / ".join(f"{v:.2f}" for v in torch.quantile(x, q).tolist())  # noqa: E731
    print(f"{args.model}, {len(cases)} zsRE training records; distance quantiles 10% / 50% / 90%\n")
    print("| layer | mean key norm | edit → its paraphrase | edit → nearest other edit | locality prompt → nearest edit |")
    print("|---|---|---|---|---|")
    for layer in layers:
        others = torch.cdist(kp[layer], kp[layer]).fill_diagonal_(float("inf")).min(-1).values
        print(f"| {layer} | {kp[layer].norm(dim=-1).mean():.1f} | {fmt((kp[layer] - kg[layer]).norm(dim=-1))} | "
              f"{fmt(others)} | {fmt(torch.cdist(kl[layer], kp[layer]).min(-1).values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
