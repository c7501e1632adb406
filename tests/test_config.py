"""Strict configs: unknown keys, wrong types, bad choices and missing files are clear errors."""
from dataclasses import dataclass
from typing import Literal

import pytest

from recipe.config import configs_dir, load_config
from recipe.editors import EDITORS
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
