"""Strict configs: unknown keys, wrong types, bad choices and missing files are clear errors; the
dataclass holds every default and the shipped YAML files only override it."""
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from recipe.config import configs_dir, load_config, load_yaml
from recipe.editors import EDITORS, load_editor
from recipe.errors import ConfigError
from recipe.models import ModelSpec, known_models


@dataclass
class Demo:
    lr: float = 1.0e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    layers: tuple[int, ...] = (1,)
    name: str | None = None


def test_defaults_and_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nsteps: 3\nmode: b\nlayers: [4, 5]\n")
    cfg = load_config(Demo, path)
    assert cfg == Demo(lr=1e-5, steps=3, mode="b", layers=(4, 5))  # "1e-5" (a YAML string) -> float


@pytest.mark.parametrize("data, needle", [
    ({"lrr": 1.0}, "unknown key"),
    ({"steps": 2.5}, "integer"),
    ({"steps": True}, "integer"),
    ({"lr": "fast"}, "number"),
    ({"mode": "c"}, "not one of"),
    ({"layers": 3}, "list"),
    ({"name": 5}, "matches none"),
])
def test_bad_values_are_named(data, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(Demo, data)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(Demo, bad)


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_shipped_editor_configs_load(name):
    path = configs_dir() / "editors" / f"{name}.yaml"
    assert path.exists(), f"every registered editor ships a config: {path}"
    load_config(EDITORS[name].config_cls, path)


@pytest.mark.parametrize("name", known_models())
def test_shipped_model_configs_load(name):
    spec = load_config(ModelSpec, configs_dir() / "models" / f"{name}.yaml")
    assert spec.name == name


# ---- one source of defaults: the dataclass; shipped YAML files only override it ----------------------
def _train_configs():
    from train.mend import MENDTrainConfig
    from train.recipe import RecipeTrainConfig
    from train.verifier import VerifierTrainConfig

    return {"recipe": RecipeTrainConfig, "recipe-finetune": RecipeTrainConfig, "recipe-scope": RecipeTrainConfig,
            "recipe-gemma3": RecipeTrainConfig, "mend-gemma3": MENDTrainConfig,
            "mend": MENDTrainConfig,
            "verifier": VerifierTrainConfig}


def _shipped_configs() -> list[tuple[str, type]]:
    from recipe.editors.mend import MENDConfig

    editors = [(f"editors/{name}.yaml", EDITORS[name].config_cls) for name in sorted(EDITORS)]
    editors.append(("editors/mend-identity.yaml", MENDConfig))
    return editors + [(f"train/{name}.yaml", cls) for name, cls in _train_configs().items()]


def _compare(cfg, default, data: dict, where: str) -> tuple[list[str], list[str]]:
    """(YAML keys whose value is the dataclass default, fields the YAML leaves alone that differ from it)."""
    restated, drifted = [], []
    for f in dataclasses.fields(default):
        value, want = getattr(cfg, f.name), getattr(default, f.name)
        if f.name not in data:
            drifted += [] if value == want else [f"{where}{f.name}"]
        elif dataclasses.is_dataclass(want) and isinstance(data[f.name], dict):
            more = _compare(value, want, data[f.name], f"{where}{f.name}.")
            restated, drifted = restated + more[0], drifted + more[1]
        elif value == want:
            restated.append(f"{where}{f.name}")
    return restated, drifted


def test_every_shipped_config_file_is_covered():
    shipped = {str(p.relative_to(configs_dir())) for p in configs_dir().glob("[et]*/*.yaml")}
    assert shipped == {path for path, _ in _shipped_configs()}


@pytest.mark.parametrize("path, cls", _shipped_configs(), ids=[p for p, _ in _shipped_configs()])
def test_shipped_yaml_only_overrides_the_dataclass(path, cls):
    data = load_yaml(configs_dir() / path)
    restated, drifted = _compare(load_config(cls, configs_dir() / path), cls(), data, "")
    assert not restated, f"{path} restates the dataclass default of {restated}: delete those lines"
    assert not drifted, f"{path}: {drifted} differ from the dataclass although the file does not set them"


def test_yaml_restating_a_default_is_detected(tmp_path):
    from recipe.editors.mend import MENDConfig

    assert _compare(load_config(MENDConfig, {"seed": 0, "architecture": {"rank": 8, "blocks": 2}}), MENDConfig(),
                    {"seed": 0, "architecture": {"rank": 8, "blocks": 2}}, "") == (["architecture.blocks", "seed"], [])


def _lm_with_every_edit_layer():
    from recipe.lm import EditedLM
    from recipe.testing import tiny_model

    model, tok, spec = tiny_model()
    layers = {"ft": 2, "ftm": 2, "grace": 2, "tpatcher": 3, "rome": 1, "memit": [1, 2], "mend": [2, 3], "wise": 2}
    return EditedLM(model, tok, dataclasses.replace(spec, edit_layers=layers))


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_an_editor_built_without_a_config_runs_the_shipped_setting(name):
    path = configs_dir() / "editors" / f"{name}.yaml"
    data = load_yaml(path)
    if "checkpoint" in data:  # a network trained for the default model: the rest must be the defaults
        assert set(data) == {"checkpoint"}
        return
    lm = _lm_with_every_edit_layer()
    assert EDITORS[name](lm).config == load_editor(name, lm).config == load_config(EDITORS[name].config_cls, path)


def test_rome_and_memit_share_their_settings_and_defaults():
    from recipe.editors.memit import MEMITConfig
    from recipe.editors.rome import RankOneConfig, ROMEConfig

    shared = {f.name for f in dataclasses.fields(RankOneConfig)}
    assert len(shared) == 10 and issubclass(ROMEConfig, RankOneConfig) and issubclass(MEMITConfig, RankOneConfig)
    rome, memit = dataclasses.asdict(ROMEConfig()), dataclasses.asdict(MEMITConfig())
    assert {k: rome[k] for k in shared} == {k: memit[k] for k in shared}


def test_trainers_share_one_config_base():
    from train.config import TrainConfig

    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    assert len(shared) >= 20
    for cls in _train_configs().values():
        assert issubclass(cls, TrainConfig) and shared <= {f.name for f in dataclasses.fields(cls)}
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(cls, {"lrr": 1.0})
        with pytest.raises(ConfigError, match="integer"):
            load_config(cls, {"max_steps": "many"})
