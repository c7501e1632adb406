"""Exploration (session 3): can a cheap pair classifier on *frozen* MiniLM sentence vectors tell a
query about an edited fact from a query about another relation of the same subject (RippleEdits'
Relation_Specificity), as a second check after the sentinel?

    RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/retrieval/verifier_probe.py

Pairs (query, the edit's statement): label 1 for the edit prompt and every generality probe, 0 for
every locality probe. Training: the first 1,500 cases of each training set (ripple-recent-train,
ripple-cf-train, zsre-train, counterfact-train); test: the first 400 RippleEdits recent-test cases.
Features [u; v; |u-v|; u*v] of the normalised MiniLM vectors, a 512-wide MLP, 30 epochs of AdamW.
Prints the share of pairs accepted (p > threshold) per probe group. Output of the session-3 run:
verifier_probe.txt beside this file.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from recipe.data import load_dataset  # noqa: E402
from recipe.retrieval.encoders import load_body, mean_pool  # noqa: E402


def pairs(names, cap):
    queries, statements, labels, groups = [], [], [], []
    for name in names:
        for c in load_dataset(name)[:cap]:
            s = c.requests[0].statement
            probes = ([(c.requests[0].prompt, 1, "prompt")] + [(g.prompt, 1, f"gen/{g.group}") for g in c.generality]
                      + [(p.prompt, 0, f"loc/{p.group}") for p in c.locality])
            for q, y, g in probes:
                queries.append(q), statements.append(s), labels.append(y), groups.append(g)
    return queries, statements, torch.tensor(labels).float(), groups


@torch.no_grad()
def features(body, tok, queries, statements):
    def embed(texts):
        out = []
        for i in range(0, len(texts), 128):
            b = tok(texts[i:i + 128], padding=True, truncation=True, max_length=128, return_tensors="pt")
            out.append(torch.nn.functional.normalize(mean_pool(body(**b).last_hidden_state, b["attention_mask"]), dim=-1))
        return torch.cat(out)
    u, v = embed(queries), embed(statements)
    return torch.cat([u, v, (u - v).abs(), u * v], 1)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    body, tok = load_body("all-MiniLM-L6-v2")
    train = pairs(["ripple-recent-train", "ripple-cf-train", "zsre-train", "counterfact-train"], 1500)
    test = pairs(["ripple-recent-test"], 400)
    x_train, x_test = features(body, tok, *train[:2]), features(body, tok, *test[:2])
    net = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], 512), torch.nn.GELU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(512, 1))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    y = train[2]
    for _ in range(30):
        perm = torch.randperm(len(y))
        for i in range(0, len(perm), 256):
            b = perm[i:i + 256]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x_train[b])[:, 0], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        p = torch.sigmoid(net(x_test)[:, 0])
    print(f"train pairs {len(y)}, test pairs {len(test[2])}")
    for threshold in (0.3, 0.5, 0.7):
        accepted = {g: float((p > threshold)[torch.tensor([x == g for x in test[3]])].float().mean())
                    for g in sorted(set(test[3]))}
        print(f"threshold {threshold}: accepted " + ", ".join(f"{g} {a:.3f}" for g, a in accepted.items()))


if __name__ == "__main__":
    main()
