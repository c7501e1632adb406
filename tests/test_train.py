"""RECIPE training on CPU with the tiny Llama, a tiny BERT body and the demo edits: the Lightning loop
runs and logs every loss term, resumes from last.ckpt, and its export loads into RecipeEditor."""
import pytest
import torch
from safetensors.torch import load_file

from recipe.config import configs_dir, load_config
from recipe.data import load_dataset
from recipe.editors import load_editor
from recipe.artifacts import RECIPE
from recipe.editors.recipe import RecipeConfig
from recipe.testing import tiny_lm
from recipe.errors import ConfigError
from train.data import RecipeDataModule, examples_from_cases
from train.recipe import RecipeTrainConfig, train

ARCH = {"encoder": "tiny-bert", "key_dim": 32, "head_hidden": 64, "head_blocks": 1, "prompt_width": 32,
        "prompt_blocks": 1, "train_body_layers": 1}
LOSSES = ["retrieval_edit", "retrieval_sentinel", "retrieval_locality", "reliability", "generality", "locality"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tmp_path, **kw) -> RecipeTrainConfig:
    return load_config(RecipeTrainConfig, configs_dir() / "train" / "recipe.yaml",
                       **{"architecture": ARCH, "batch_size": 4, "precision": "32-true", "wandb": "disabled",
                          "run_dir": str(tmp_path / "run"), "out": str(tmp_path / "artifact"), "val_every": 2,
                          "limit_val_batches": 1, "warmup_steps": 1, **kw})


def test_configs_load_strictly():
    cfg = load_config(RecipeTrainConfig, configs_dir() / "train" / "recipe.yaml")
    assert cfg.batch_size == 8 and cfg.architecture.key_dim == 512 and cfg.weights.locality == 1.0
    assert load_config(RecipeConfig, configs_dir() / "editors" / "recipe.yaml").prefix_mode == "vectors+statement"


def test_examples_use_prompt_when_no_paraphrase():
    cases = load_dataset("demo")
    ex = examples_from_cases(cases)
    assert len(ex) == len(cases) and ex[0].paraphrase == cases[0].generality[0].prompt
    assert ex[0].statement == cases[0].request.statement and ex[0].locality_answer == cases[0].locality[0].target


def test_fast_dev_run_logs_every_loss_and_exports_a_loadable_artifact(tmp_path):
    lm = tiny_lm()
    result = train(tiny_config(tmp_path), lm=lm, cases=load_dataset("demo"), fast_dev_run=True, progress=False)
    assert result.global_step == 1
    for name in LOSSES:
        assert torch.isfinite(torch.tensor(result.metrics[f"train/loss/{name}"]))
        assert f"val/loss/{name}" in result.metrics
    for name in ["train/retrieval/top1", "train/sentinel/reject_locality", "train/sentinel/accept_paraphrase"]:
        assert name in result.metrics

    exported = load_file(str(result.artifact / RECIPE.weights_file))
    editor = load_editor("recipe", lm, checkpoint=str(result.artifact), sentinel_mode="fixed", threshold=-1.0e9)
    assert set(exported) == set(editor.networks.artifact_state())  # every trained tensor, nothing else
    assert {v.dtype for v in exported.values()} == {torch.float16}
    loaded = editor.networks.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in exported.items())
    query = ["The Eiffel Tower is located in the city of"]
    base = lm.score(query, ["Rome"])[0]
    ids = editor.edit(load_dataset("demo", limit=2)[0].requests)
    edited = lm.score(query, ["Rome"])[0]
    assert editor.last_retrieval[0].edit_id == ids[0]  # the fixed threshold accepts the only entry
    assert edited.logprobs != base.logprobs  # ... and its prefix reaches the LM
    assert lm.score(query, ["Rome"], prefixes=None)[0] == base  # without the prefix: the base model


def test_training_resumes_from_last_checkpoint(tmp_path):
    cases = load_dataset("demo")
    first = train(tiny_config(tmp_path, max_steps=2), lm=tiny_lm(), cases=cases, progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert first.global_step == 2 and last.exists()
    saved = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert saved and not any(k.startswith("lm.") for k in saved)  # the frozen LM is never saved
    second = train(tiny_config(tmp_path, max_steps=3), lm=tiny_lm(), cases=cases, progress=False)
    assert second.global_step == 3  # continued from step 2, not from 0


def test_losses_with_targets_and_locality_answers_of_different_lengths():
    from recipe.editors.recipe import RecipeNetworks
    from recipe.retrieval.encoders import RecipeArchitecture
    from train.data import TrainExample
    from train.module import RecipeModule

    lm = tiny_lm()
    module = RecipeModule(lm, RecipeNetworks.build(lm, RecipeArchitecture(**ARCH))).eval()  # no dropout: comparable
    batch = [TrainExample("The capital of France is", "the city of Rome in Italy", "France's capital is",
                          "Big Ben is located in", "London"),
             TrainExample("Hey Jude was performed by", "Madonna", "Hey Jude is a song by", None, None),
             TrainExample("The Amazon river flows through", "Italy", "The Amazon river flows through",
                          "Mount Everest is the highest mountain on", "Earth and in the whole world")]
    loss, logs = module._step(batch)
    assert torch.isfinite(loss) and set(LOSSES) <= {k.split("/", 1)[1] for k in logs if k.startswith("loss/")}
    # the batched locality KL (answers of 1 and 6 tokens, one row without) equals the rows' KLs one at a time
    assert logs["loss/locality"].item() == pytest.approx(_locality_kl_row_by_row(module, batch), rel=1e-4)
    loss.backward()
    assert module.networks.sentinel.r_s.grad is not None and module.networks.prompt_encoder.base.grad is not None


def test_scope_probes_come_from_relation_specificity_and_train_when_weighted():
    from recipe.editors.recipe import RecipeNetworks
    from recipe.retrieval.encoders import RecipeArchitecture
    from recipe.types import EditCase, EditRequest, Probe
    from train.data import TrainExample
    from train.module import LossWeights, RecipeModule

    case = EditCase("r1", "ripple", (EditRequest("Leonardo DiCaprio is a citizen of", "Syria", "Leonardo DiCaprio"),),
                    generality=(), locality=(Probe("The occupation of Leonardo DiCaprio is", "actor", "Relation_Specificity"),
                                             Probe("The capital of Peru is", "Lima", "Forgetfulness")))
    (ex,) = examples_from_cases([case], seed=3)
    assert (ex.scope_prompt, ex.scope_answer) == ("The occupation of Leonardo DiCaprio is", "actor")
    assert examples_from_cases([case], seed=3) == [ex]  # seeded
    plain = EditCase("r2", "ripple", case.requests, generality=(), locality=case.locality[1:])
    assert examples_from_cases([plain], seed=3)[0].scope_prompt is None

    lm = tiny_lm()
    batch = [TrainExample("Leonardo DiCaprio is a citizen of", "Syria", "DiCaprio holds the citizenship of",
                          "The capital of Peru is", "Lima", "The occupation of Leonardo DiCaprio is", "actor"),
             TrainExample("Hey Jude was performed by", "Madonna", "Hey Jude is a song by", None, None,
                          "Hey Jude was released in the year", "1968 as a single"),
             TrainExample("The Amazon river flows through", "Italy", "The Amazon river flows through", None, None)]
    networks = RecipeNetworks.build(lm, RecipeArchitecture(**ARCH))
    off = RecipeModule(lm, networks).train()
    _, logs = off._step(batch)
    assert "loss/scope" not in logs and "loss/retrieval_scope" not in logs  # weight 0: not even computed
    on = RecipeModule(lm, networks, weights=LossWeights(retrieval_scope=1.0, scope=1.0)).eval()
    loss, logs = on._step(batch)
    assert {"loss/scope", "loss/retrieval_scope", "sentinel/reject_scope", "edit/scope_acc"} <= set(logs)
    # the batched scope KL (answers of 1 and 4 tokens, one row without) equals the rows' KLs one at a time
    scoped = [TrainExample(e.prompt, e.target, e.paraphrase, e.scope_prompt, e.scope_answer)
              for e in batch if e.scope_prompt is not None]
    assert logs["loss/scope"].item() == pytest.approx(_locality_kl_row_by_row(on, scoped), rel=1e-4)
    with torch.no_grad():  # validation measures the scope terms whatever their weight
        assert "loss/scope" in RecipeModule(lm, networks).eval()._step(batch)[1]
    networks.zero_grad()
    (logs["loss/retrieval_scope"] + logs["loss/scope"]).backward()
    assert networks.sentinel.r_s.grad is not None and networks.prompt_encoder.base.grad is not None


def _locality_kl_row_by_row(module, batch) -> float:
    """Σ over locality answer tokens of KL(base || prefixed), divided by their count, one row per forward."""
    from recipe.editors.recipe import edit_prefix
    from recipe.retrieval.statements import statement_token_ids
    from train.module import target_logits

    lm, networks, total, count = module.lm, module.networks, 0.0, 0
    with torch.no_grad():
        for e in [e for e in batch if e.locality_prompt is not None]:
            vectors = networks.prompt_encoder(networks.encoder.knowledge_head(networks.encoder.features([e.statement])))
            prefix = edit_prefix(vectors[0], statement_token_ids(lm, e.statement, module.separator))
            prefixed = torch.log_softmax(target_logits(lm, [e.locality_prompt], [e.locality_answer], [prefix])[0], -1)
            base = torch.log_softmax(target_logits(lm, [e.locality_prompt], [e.locality_answer], None)[0], -1)
            total += (base.exp() * (base - prefixed)).sum().item()  # (1, L, V) -> Σ over slots and vocabulary
            count += base.shape[1]
    return total / count


def test_fine_tuning_starts_from_an_exported_artifact(tmp_path):
    lm = tiny_lm()
    first = train(tiny_config(tmp_path / "a", statement_separator=" | "), lm=lm, cases=load_dataset("demo"),
                  fast_dev_run=True, progress=False)
    start = load_file(str(first.artifact / RECIPE.weights_file))
    cfg = tiny_config(tmp_path / "b", init_from=str(first.artifact), lr=0.0, body_lr=0.0, sentinel_lr=0.0)
    second = train(cfg, lm=lm, cases=load_dataset("demo"), fast_dev_run=True, progress=False)
    again = load_file(str(second.artifact / RECIPE.weights_file))
    assert set(again) == set(start) and all(torch.equal(again[k], start[k]) for k in start)  # lr 0: unchanged
    meta = (first.artifact / "recipe.json").read_text()
    assert '"statement_separator": " | "' in meta
    with pytest.raises(ConfigError, match="prefix_mode"):
        train(tiny_config(tmp_path / "c", init_from=str(first.artifact), prefix_mode="vectors"), lm=lm,
              cases=load_dataset("demo"), fast_dev_run=True, progress=False)


def test_a_prefix_of_the_validation_batches_sees_every_set(monkeypatch):
    import dataclasses

    import train.data

    demo = load_dataset("demo") * 4  # 4 validation examples per set

    def tagged(name, *args):  # two sets of the same shape, told apart by their prompts
        return [dataclasses.replace(c, requests=[dataclasses.replace(r, prompt=f"{name}: {r.prompt}") for r in c.requests])
                for c in demo]

    monkeypatch.setattr(train.data, "load_dataset", tagged)
    data = RecipeDataModule(["a", "b"], batch_size=2, val_size=8)
    data.setup()
    sets = [e.prompt.split(":")[0] for e in data.val_examples]
    assert sorted(sets) == ["a"] * 4 + ["b"] * 4 and set(sets[:4]) == {"a", "b"}  # the first two batches


def test_dataset_repeats_add_examples_but_never_validation_prompts():
    data = RecipeDataModule(["demo"], batch_size=2, val_size=8, repeats={"demo": 3})
    data.setup()
    once = RecipeDataModule(["demo"], batch_size=2, val_size=8)
    once.setup()
    held = {e.prompt for e in data.val_examples}
    assert len(data.train_examples) == 3 * len(once.train_examples)
    assert held and not held & {e.prompt for e in data.train_examples}
    with pytest.raises(ConfigError, match="dataset_repeats"):
        RecipeDataModule(["demo"], repeats={"zsre": 2})
