"""Retrieval and sentinel of a RECIPE checkpoint on a whole edit set, without the LM's edit scoring.

    RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_check.py \
        --checkpoint checkpoints/recipe-smollm2 --dataset zsre [--calibrate zsre-train,ripple-recent-train]

All statements of the set go into one repository (as after a lifelong run). For edit prompts and
paraphrases: recall@1 of their own edit, how often the learned sentinel accepts, and how often it
accepts the *right* edit. For locality prompts: how often the sentinel rejects. With ``--calibrate``,
the best single fixed threshold (the ``sentinel_mode: fixed`` ablation) is chosen on those
*training* sets, maximising the mean of (right edit accepted for prompts/paraphrases) and (locality
rejected), then applied to the evaluation set beside the learned sentinel.

Also written: ``groups`` (the same rates per probe group, e.g. RippleEdits' Subject_Aliasing or
Relation_Specificity), ``target_right@1`` (the retrieved edit has the query's own answer, which
counts when the set edits one question twice to the same answer), ``margins`` (the learned sentinel
made stricter by a constant: accepted only when top score > threshold + m, for ``--margins``) and,
with ``--raw``, recall@1 of the untrained MiniLM's cosine similarity (query vs statement) and of
its sum with the learned score, to tell what training the retriever bought.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recipe.data import load_dataset  # noqa: E402
from recipe.artifacts import load_recipe_artifact as load_artifact  # noqa: E402
from recipe.lm import EditedLM  # noqa: E402
from recipe.models import load_model  # noqa: E402


@torch.no_grad()
def scores_for(nets, cases) -> dict:
    """Top-1 index/score and learned threshold for every query kind of ``cases``."""
    statements, targets, own, queries, kinds, groups = [], [], [], [], [], []
    for c in cases:
        for r in c.requests:
            statements.append(r.statement)
            targets.append(r.target_new.strip().casefold())
        i = len(statements) - 1
        queries += [c.requests[0].prompt] + [g.prompt for g in c.generality] + [p.prompt for p in c.locality]
        kinds += ["prompt"] + ["paraphrase"] * len(c.generality) + ["locality"] * len(c.locality)
        groups += ["prompt"] + [f"paraphrase/{g.group}" for g in c.generality] + [f"locality/{p.group}" for p in c.locality]
        own += [i] * (1 + len(c.generality)) + [-1] * len(c.locality)
    enc, bs = nets.encoder, 64
    r_k = torch.cat([enc.encode_knowledge(statements[s:s + bs]) for s in range(0, len(statements), bs)]).float()
    r_q = torch.cat([enc.encode_query(queries[s:s + bs]) for s in range(0, len(queries), bs)]).float()
    s = r_q @ r_k.T / math.sqrt(nets.arch.key_dim)  # (Q, K)
    top, idx = s.max(1)
    return {"top": top, "idx": idx, "threshold": nets.sentinel(r_q).float(), "own": torch.tensor(own), "kinds": kinds,
            "groups": groups, "targets": targets, "statements": statements, "queries": queries, "scores": s}


def rates(d: dict, threshold: torch.Tensor | float, by: str = "kinds") -> dict:
    """Acceptance/recall rates per query kind (``by="kinds"``) or per probe group (``by="groups"``)."""
    accept = d["top"] > threshold
    out = {}
    for kind in dict.fromkeys(d[by]):
        m = torch.tensor([k == kind for k in d[by]])
        if kind.startswith("locality"):
            out[f"{kind}/rejected"] = float((~accept[m]).float().mean())
        else:
            right = d["idx"][m] == d["own"][m]
            out[f"{kind}/recall@1"] = float(right.float().mean())
            out[f"{kind}/accepted"] = float(accept[m].float().mean())
            out[f"{kind}/right_and_accepted"] = float((right & accept[m]).float().mean())
    return out


def target_right(d: dict) -> dict:
    """Share of prompts/paraphrases whose retrieved edit carries their own answer (not necessarily own edit)."""
    out = {}
    for kind in ("prompt", "paraphrase"):
        rows = [i for i, k in enumerate(d["kinds"]) if k == kind]
        if rows:
            same = [d["targets"][int(d["idx"][i])] == d["targets"][int(d["own"][i])] for i in rows]
            out[f"{kind}/target_right@1"] = sum(same) / len(same)
    return out


def with_verifier(d: dict, path: str, thresholds: list[float], margins: list[float]) -> dict:
    """Per-group rates when the verifier must also pass each accepted (query, top-1) pair, for the
    learned sentinel shifted by each margin (a negative margin accepts more and lets the verifier veto)."""
    from recipe.artifacts import load_verifier

    verifier, _ = load_verifier(path)
    rows = (d["top"] > d["threshold"] + min(margins)).nonzero()[:, 0].tolist()
    p = torch.zeros(len(d["queries"]))
    p[rows] = verifier.probability([d["queries"][i] for i in rows], [d["statements"][int(d["idx"][i])] for i in rows])
    out = {}
    for m in margins:
        for t in thresholds:
            threshold = d["threshold"] + m
            threshold[p <= t] = math.inf  # vetoed: never accepted
            out[f"margin {m} / p > {t}"] = {"kinds": rates(d, threshold), "groups": rates(d, threshold, by="groups")}
    return out


@torch.no_grad()
def raw_minilm(d: dict) -> dict:
    """recall@1 of the untrained all-MiniLM-L6-v2 cosine, alone and added to the learned score."""
    from recipe.retrieval.encoders import load_body, mean_pool

    body, tok = load_body("all-MiniLM-L6-v2")

    def embed(texts):
        out = []
        for s in range(0, len(texts), 64):
            b = tok(texts[s:s + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = body(**b).last_hidden_state  # (B, T, d)
            out.append(torch.nn.functional.normalize(mean_pool(h, b["attention_mask"]), dim=-1))  # as MiniLM
        return torch.cat(out)

    cos = embed(d["queries"]) @ embed(d["statements"]).T  # (Q, K)
    out = {}
    for name, s in (("raw", cos), ("learned+10raw", d["scores"] + 10 * cos)):
        for kind in ("prompt", "paraphrase"):
            m = torch.tensor([k == kind for k in d["kinds"]])
            out[f"{name}/{kind}/recall@1"] = float((s[m].argmax(1) == d["own"][m]).float().mean())
    return out


def best_fixed(d: dict) -> float:
    best, best_t = -1.0, 0.0
    for t in torch.quantile(d["top"], torch.linspace(0.01, 0.99, 197)).tolist():
        r = rates(d, t)
        edit = (r["prompt/right_and_accepted"] + r.get("paraphrase/right_and_accepted", r["prompt/right_and_accepted"])) / 2
        value = (edit + r["locality/rejected"]) / 2
        if value > best:
            best, best_t = value, t
    return best_t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/recipe-smollm2")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="zsre")
    p.add_argument("--limit", type=int)
    p.add_argument("--calibrate", help="comma-separated training sets for the fixed-threshold ablation")
    p.add_argument("--margins", default="0,0.5,1,1.5,2,3", help="constants added to the learned threshold")
    p.add_argument("--raw", action="store_true", help="also rank by the untrained MiniLM's cosine")
    p.add_argument("--verifier", help="an EditVerifier artefact: rates with its veto on accepted entries")
    p.add_argument("--verifier-thresholds", default="0.3,0.5,0.7")
    p.add_argument("--verifier-margins", default="-2,-1,0", help="sentinel margins tried with the verifier")
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "retrieval")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lm = EditedLM(*load_model(args.model))
    nets, _ = load_artifact(args.checkpoint, lm)
    nets.eval()
    d = scores_for(nets, load_dataset(args.dataset, args.data_dir, args.limit))
    result = {"checkpoint": args.checkpoint, "dataset": args.dataset, "learned": rates(d, d["threshold"]),
              "target_right@1": target_right(d), "groups": rates(d, d["threshold"], by="groups"),
              "margins": {m: rates(d, d["threshold"] + float(m), by="groups") for m in args.margins.split(",")}}
    if args.raw:
        result["raw_minilm"] = raw_minilm(d)
    if args.verifier:
        result["verifier"] = {"path": args.verifier, **with_verifier(
            d, args.verifier, [float(t) for t in args.verifier_thresholds.split(",")],
            [float(m) for m in args.verifier_margins.split(",")])}
    if args.calibrate:
        cal = [c for name in args.calibrate.split(",") for c in load_dataset(name, args.data_dir)]
        t = best_fixed(scores_for(nets, cal))
        result["fixed"] = {"threshold": t, "calibrated_on": args.calibrate, **rates(d, t)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{Path(args.checkpoint).name}-{args.dataset}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
