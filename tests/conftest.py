"""Shared fixtures: the real data directory (skips when absent) and a tiny random Llama."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_data_dir() -> Path | None:
    env = os.environ.get("RECIPE_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for path in candidates:
        if (path / "manifest.json").exists() or (path / "zsre").is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared datasets folder; tests that need real records skip cleanly without it."""
    path = _find_data_dir()
    if path is None:
        pytest.skip("real datasets not found: set RECIPE_DATA_DIR (see README, 'Data')")
    return path


@pytest.fixture(scope="session")
def _tiny_built():
    """The tiny model, built once per test run, and the torch RNG state right after building it."""
    import torch

    from recipe.testing import tiny_lm

    lm = tiny_lm()
    return lm, torch.get_rng_state()


@pytest.fixture
def tiny(_tiny_built):
    """A fresh tiny random Llama wrapped in EditedLM (built in code, no downloads).

    Each test gets its own deep copy, so edits to its weights stay in that test, and the torch RNG
    is where ``tiny_lm()`` leaves it, so random draws after the fixture match a fresh build.
    """
    import copy

    import torch

    lm, rng_state = _tiny_built
    torch.set_rng_state(rng_state)
    return copy.deepcopy(lm)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny model saved as a Hugging Face folder (``--model FOLDER`` on the command line)."""
    from recipe.testing import tiny_model

    model, tokenizer, _ = tiny_model()
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and far faster than two on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def benchmark_script():
    """``load(name)``: the module ``benchmarks/<name>.py`` (the benchmark folder is not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
