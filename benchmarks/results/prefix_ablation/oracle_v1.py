# Session-2 diagnostic that found the missing separator (v1 checkpoint, 150 seeded zsRE single edits, oracle prefix).
# Run from the repo root: RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/results/prefix_ablation/oracle_v1.py 150
# (checkpoints/recipe-smollm2 then held v1: git show b37ea58:checkpoints/recipe-smollm2/weights.safetensors).
# benchmarks/prefix_ablation.py is the tidy, reusable version with the seen/never-seen split.
import sys, time, torch
torch.set_num_threads(1)
from recipe.models import load_model
from recipe.data.registry import load_dataset
from recipe.editors.recipe import load_artifact, build_prefix, statement_token_ids
import random
from recipe.lm import EditedLM
lm = EditedLM(*load_model("smollm2-135m"))
cases = load_dataset("zsre")
random.Random(0).shuffle(cases)
cases = cases[:int(sys.argv[1])]
nets = load_artifact("checkpoints/recipe-smollm2", lm)[0]
emb = lm.model.get_input_embeddings()
def tok(text): return lm.tokenizer(text, add_special_tokens=False).input_ids
variants = {}
def run(name, make):
    rel, gen = [], []
    t = time.time()
    for c in cases:
        r = c.requests[0]
        pre = make(r)
        ps = [r.prompt] + [g.prompt for g in c.generality]
        ts = [r.target_new] + [g.target for g in c.generality]
        sc = lm.score(ps, ts, [pre] * len(ps))
        rel.append(sc[0].accuracy); gen += [s.accuracy for s in sc[1:]]
    print(f"{name:40s} rel {sum(rel)/len(rel):.3f} gen {sum(gen)/len(gen):.3f} ({time.time()-t:.0f}s)", flush=True)
with torch.no_grad():
    run("none", lambda r: None)
    run("statement tokens", lambda r: emb(torch.tensor(tok(r.statement))))
    run("statement + newline", lambda r: emb(torch.tensor(tok(r.statement + "\n"))))
    run("statement + '. '", lambda r: emb(torch.tensor(tok(r.statement + ". "))))
    def full(r):
        rk = nets.encoder.encode_knowledge([r.statement])
        v = nets.prompt_encoder(rk)[0]
        return build_prefix(lm, v, statement_token_ids(lm, r.statement))
    run("checkpoint vectors+statement", full)
    def vec_nl(r):
        rk = nets.encoder.encode_knowledge([r.statement])
        v = nets.prompt_encoder(rk)[0]
        return build_prefix(lm, v, tok(r.statement + "\n"))
    run("checkpoint vectors+statement+newline", vec_nl)
