"""KnowledgeRepository: add/search/remove semantics, input checks, save/load and crash safety."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from recipe.retrieval import (
    DuplicateIdError,
    KnowledgeRepository,
    RepositoryCorruptError,
    RepositoryInputError,
    RepositoryMismatchError,
    RepositoryNotFoundError,
    UnknownIdError,
)
from recipe.retrieval.repository import META_FILE, TENSOR_FILE
from recipe.retrieval.tensor_file import TensorFile
from recipe.retrieval.tensor_file import write as write_tensor_file
from recipe.storage import reseal

REPO_ROOT = Path(__file__).resolve().parents[1]
D, L, H = 16, 3, 8
INFO = {"lm": "tiny-llama", "hidden_size": H, "encoder": "random"}


def unit_keys(n: int, seed: int = 0) -> np.ndarray:
    keys = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)  # (n, D)
    return keys / np.linalg.norm(keys, axis=1, keepdims=True)


def random_prompts(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, L, H, generator=torch.Generator().manual_seed(seed))  # (n, L, H)


def filled(n: int = 20, **kwargs) -> tuple[KnowledgeRepository, np.ndarray, torch.Tensor]:
    repo = KnowledgeRepository(D, (L, H), info=INFO, **kwargs)
    keys, prompts = unit_keys(n), random_prompts(n)
    assert repo.add(keys, prompts) == list(range(n))
    return repo, keys, prompts


def test_add_search_remove_round_trip():
    repo, keys, prompts = filled(50)
    queries = keys + 0.01 * unit_keys(50, seed=1)  # (50, D) each near its own key
    scores, ids = repo.search(queries, k=3)
    assert scores.shape == ids.shape == (50, 3) and scores.dtype == np.float32 and ids.dtype == np.int64
    assert ids[:, 0].tolist() == list(range(50))
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores[:, 0], np.sum(queries * keys, axis=1), rtol=1e-5)
    assert torch.equal(repo.get_prompts([7, 2]), prompts[[7, 2]])
    np.testing.assert_array_equal(repo.keys([7, 2]), keys[[7, 2]])

    repo.remove([3, 10, 40])
    _, ids = repo.search(queries, k=1)
    kept = [i for i in range(50) if i not in (3, 10, 40)]
    assert ids[kept, 0].tolist() == kept
    assert not set(ids[[3, 10, 40], 0].tolist()) & {3, 10, 40}
    assert len(repo) == 47 and 3 not in repo and 4 in repo
    np.testing.assert_array_equal(repo.keys(), keys[kept])


def test_ids_stable_after_removals_and_never_reused():
    repo, keys, prompts = filled(5)
    repo.remove([1, 3])
    assert repo.add(unit_keys(2, seed=5), random_prompts(2, seed=5)) == [5, 6]
    assert repo.ids() == [0, 2, 4, 5, 6]
    assert torch.equal(repo.get_prompts([4])[0], prompts[4])
    assert repo.search(keys[4:5])[1][0, 0] == 4
    assert repo.add(unit_keys(1, seed=6), random_prompts(1, seed=6), ids=[1]) == [1]  # explicit reuse is allowed
    assert repo.add(unit_keys(1, seed=7), random_prompts(1, seed=7)) == [7]


def test_remove_unknown_id_raises_and_changes_nothing():
    repo, keys, _ = filled(5)
    with pytest.raises(UnknownIdError, match=r"99"):
        repo.remove([0, 99])
    assert len(repo) == 5 and repo.ids() == list(range(5))
    assert repo.search(keys[:1])[1][0, 0] == 0
    with pytest.raises(UnknownIdError):
        repo.get_prompts([99])


@pytest.mark.parametrize("ids", [[1, 1], [2, 3]], ids=["repeated", "existing"])
def test_duplicate_ids_raise_and_add_nothing(ids):
    repo = KnowledgeRepository(D, (L, H))
    repo.add(unit_keys(2), random_prompts(2), ids=[2, 5])
    with pytest.raises(DuplicateIdError):
        repo.add(unit_keys(2, seed=1), random_prompts(2, seed=1), ids=ids)
    assert repo.ids() == [2, 5]


def _nan(x):
    x = x.clone() if isinstance(x, torch.Tensor) else x.copy()
    x[0, 0] = float("nan")
    return x


@pytest.mark.parametrize(
    "keys, prompts, ids",
    [
        (unit_keys(2)[:, :-1], random_prompts(2), None),  # wrong key dim
        (unit_keys(2)[0], random_prompts(1), None),  # 1-D key
        (unit_keys(2), random_prompts(2)[:, :, :-1], None),  # wrong H
        (unit_keys(2), random_prompts(3), None),  # N mismatch
        (_nan(unit_keys(2)), random_prompts(2), None),
        (unit_keys(2), _nan(random_prompts(2)), None),
        (unit_keys(2).astype(np.int64), random_prompts(2), None),
        (unit_keys(2), random_prompts(2), [0, -1]),
        (unit_keys(2), random_prompts(2), [0]),
        (unit_keys(2), random_prompts(2), [0, 1.5]),
    ],
    ids=["key-dim", "key-1d", "prompt-H", "count", "nan-key", "nan-prompt", "int-keys", "neg-id", "n-ids", "float-id"],
)
def test_bad_input_raises_and_adds_nothing(keys, prompts, ids):
    repo = KnowledgeRepository(D, (L, H))
    with pytest.raises(RepositoryInputError):
        repo.add(keys, prompts, ids=ids)
    assert len(repo) == 0
    with pytest.raises(RepositoryInputError):
        repo.search(unit_keys(1), k=0)


def test_empty_repository_and_short_results():
    repo = KnowledgeRepository(D, (L, H))
    scores, ids = repo.search(unit_keys(2), k=3)
    assert ids.tolist() == [[-1] * 3] * 2 and np.all(np.isneginf(scores))
    repo.add(unit_keys(2), random_prompts(2))
    scores, ids = repo.search(unit_keys(2), k=4)
    assert (ids[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all() and np.isfinite(scores[:, :2]).all()
    assert repo.get_prompts([]).shape == (0, L, H)


def test_accepts_torch_inputs_in_any_float_dtype():
    repo = KnowledgeRepository(D, (L, H))
    keys = torch.from_numpy(unit_keys(4))
    repo.add(keys.to(torch.bfloat16), random_prompts(4).half())
    scores, ids = repo.search(keys.to(torch.float64), k=1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3]


def test_buffered_single_adds_are_searchable_immediately():
    repo = KnowledgeRepository(D, (L, H), flush_size=8)
    keys = unit_keys(20)
    for i in range(20):
        repo.add(keys[i : i + 1], random_prompts(1, seed=i))
        assert repo.search(keys[i : i + 1])[1][0, 0] == i
    for i in range(20, 25):  # without searches in between, adds stay buffered below flush_size
        repo.add(unit_keys(1, seed=100 + i), random_prompts(1))
    assert repo._index.ntotal == 20 and len(repo) == 25
    assert repo.search(unit_keys(1, seed=124))[1][0, 0] == 24


@pytest.mark.parametrize("prompt_dtype", ["float32", "float16"])
def test_save_load_round_trip(tmp_path, prompt_dtype):
    repo, keys, prompts = filled(30, prompt_dtype=prompt_dtype)
    repo.remove([4, 5])
    queries = unit_keys(8, seed=3)
    before = repo.search(queries, k=5)
    path = repo.save(tmp_path / "repo")
    meta = json.loads((path / META_FILE).read_text())
    assert meta["count"] == 28 and meta["prompt_shape"] == [L, H] and meta["info"] == INFO

    loaded = KnowledgeRepository.load(path, expect_info={"hidden_size": H, "lm": "tiny-llama"})
    assert loaded.ids() == repo.ids() and loaded.info == INFO and loaded.prompt_dtype == prompt_dtype
    after = loaded.search(queries, k=5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(loaded.keys(), repo.keys())
    kept = repo.ids()
    if prompt_dtype == "float32":
        assert torch.equal(loaded.get_prompts(kept), prompts[kept])
    else:
        torch.testing.assert_close(loaded.get_prompts(kept), prompts[kept], atol=1e-2, rtol=1e-3)
    assert loaded.add(unit_keys(1, seed=9), random_prompts(1)) == [30]  # next_id survives


def test_save_replaces_previous_and_empty_repository_round_trips(tmp_path):
    KnowledgeRepository(D, (L, H)).save(tmp_path / "r")
    assert len(KnowledgeRepository.load(tmp_path / "r")) == 0
    filled(3)[0].save(tmp_path / "r")
    assert KnowledgeRepository.load(tmp_path / "r").ids() == [0, 1, 2]
    assert _listing(tmp_path) == ["r"]


def test_load_with_mismatched_info_names_the_field(tmp_path):
    filled(3)[0].save(tmp_path / "r")
    with pytest.raises(RepositoryMismatchError, match=r"hidden_size.*8.*640"):
        KnowledgeRepository.load(tmp_path / "r", expect_info={"hidden_size": 640})
    with pytest.raises(RepositoryMismatchError, match=r"tokenizer"):
        KnowledgeRepository.load(tmp_path / "r", expect_info={"tokenizer": "x"})


def _listing(folder: Path) -> list[str]:
    """The names in ``folder`` but the save lock's file (``.<name>.lock``, which stays)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: _flip_byte(d / TENSOR_FILE),
        lambda d: os.truncate(d / TENSOR_FILE, (d / TENSOR_FILE).stat().st_size // 2),
        lambda d: (d / TENSOR_FILE).unlink(),
        lambda d: (d / META_FILE).unlink(),
        lambda d: (d / META_FILE).write_text('{"format": "recipe.knowl'),
        lambda d: _edit_json(d / META_FILE, count=4),
        lambda d: _edit_json(d / META_FILE, prompt_shape=[L, H + 1]),
        lambda d: _edit_json(d / META_FILE, format_version=99),
    ],
    ids=["checksum", "truncated", "no-tensors", "no-json", "bad-json", "count", "shape", "version"],
)
def test_damaged_repository_raises_corrupt(tmp_path, damage):
    path = filled(3)[0].save(tmp_path / "r")
    damage(path)
    with pytest.raises(RepositoryCorruptError):
        KnowledgeRepository.load(path)


def test_missing_repository_raises_not_found(tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        KnowledgeRepository.load(tmp_path / "nothing")


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="refusing"):
        filled(2)[0].save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_save_leaves_previous_repository_and_no_leftovers(tmp_path, monkeypatch):
    old, _, old_prompts = filled(4)
    old.save(tmp_path / "r")
    new = filled(9)[0]
    import recipe.retrieval.repository as module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "_write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "r")
    assert _listing(tmp_path) == ["r"]
    assert torch.equal(KnowledgeRepository.load(tmp_path / "r").get_prompts(range(4)), old_prompts)


_CRASHING_SAVE = textwrap.dedent(
    """
    import os, sys, torch
    import recipe.retrieval.repository as module
    directory, point = sys.argv[1], sys.argv[2]
    repo = module.KnowledgeRepository.load(directory)
    repo.remove([0])
    repo.add(torch.ones(5, {D}), torch.ones(5, {L}, {H}))
    if point == "after-tensors":
        write = module._write_tensors
        def _write_tensors(*args):
            write(*args)
            os._exit(1)
        module._write_tensors = _write_tensors
    else:
        rename = os.rename
        def _rename(src, dst):
            rename(src, dst)
            if str(dst).endswith(".old"):
                os._exit(1)
        os.rename = _rename
    repo.save(directory)
    """
).format(D=D, L=L, H=H)


@pytest.mark.parametrize("point", ["after-tensors", "after-old-moved-away"])
def test_save_killed_midway_keeps_previous_repository_loadable(tmp_path, point):
    repo, keys, prompts = filled(6)
    path = repo.save(tmp_path / "r")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", _CRASHING_SAVE, str(path), point], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    leftovers = sorted(name.split("-")[0] for name in _listing(tmp_path))  # drop the .tmp-<uuid> suffix
    assert leftovers == ([".r.old", ".r.tmp"] if point == "after-old-moved-away" else [".r.tmp", "r"])

    survived = KnowledgeRepository.load(path)  # from r, or from .r.old when r is gone
    assert survived.ids() == list(range(6))
    assert torch.equal(survived.get_prompts(range(6)), prompts)
    np.testing.assert_array_equal(survived.search(keys)[1][:, 0], np.arange(6))

    survived.remove([5])
    survived.save(path)  # repairs the layout, then writes the new state
    assert _listing(tmp_path) == ["r"]
    assert KnowledgeRepository.load(path).ids() == [0, 1, 2, 3, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0, reason="faiss sees no GPU")
def test_gpu_search_matches_cpu_after_adds_and_removals():
    cpu, keys, _ = filled(200, use_gpu=False)
    gpu, _, _ = filled(200, use_gpu=True)
    queries = unit_keys(32, seed=4)
    for step in range(3):
        np.testing.assert_array_equal(gpu.search(queries, k=5)[1], cpu.search(queries, k=5)[1])
        for repo in (cpu, gpu):
            repo.remove(range(step * 10, step * 10 + 10))
            repo.add(unit_keys(7, seed=10 + step), random_prompts(7))


@pytest.mark.parametrize("name", [META_FILE, TENSOR_FILE, "manifest.json"])
def test_a_flipped_byte_in_any_file_names_the_file(tmp_path, name):
    path = filled(3)[0].save(tmp_path / "r")
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(RepositoryCorruptError, match=re.escape(name)):
        KnowledgeRepository.load(path)


def test_changed_text_in_repository_json_is_an_error(tmp_path):
    repo = filled(2)[0]
    repo.info = {**INFO, "statements": ["The mother tongue of Danielle Darrieux is English"]}
    path = repo.save(tmp_path / "r")
    text = (path / META_FILE).read_text()
    (path / META_FILE).write_text(text.replace("English", "Swahili"))
    with pytest.raises(RepositoryCorruptError, match=f"{META_FILE}: sha256"):
        KnowledgeRepository.load(path)


def _edit_and_reseal(path: Path, **changes) -> None:
    _edit_json(path / META_FILE, **changes)
    reseal(path)  # a consistent manifest: only the value checks stand between the edit and the model


def _nan_keys(path: Path) -> None:
    with TensorFile(path / TENSOR_FILE) as f:
        tensors = {name: f.read(name) for name in f.entries}
    tensors["keys"][1, 0] = float("nan")
    write_tensor_file(path / TENSOR_FILE, tensors, {})
    reseal(path)


@pytest.mark.parametrize(
    "damage, message",
    [(lambda d: _edit_and_reseal(d, next_id=0), "next_id 0"),
     (lambda d: _edit_and_reseal(d, next_id=2), "next_id 2"),
     (lambda d: _edit_and_reseal(d, count=4), "count 4"),
     (lambda d: _edit_and_reseal(d, prompt_shape=[L, H + 1]), "prompts"),
     (lambda d: _edit_and_reseal(d, key_dim=-1), "key_dim"),
     (_nan_keys, "NaN")],
    ids=["next-id-0", "next-id-reused", "count", "shape", "key-dim", "nan"],
)
def test_out_of_range_values_are_refused_even_with_a_matching_manifest(tmp_path, damage, message):
    path = filled(3)[0].save(tmp_path / "r")
    damage(path)
    with pytest.raises(RepositoryCorruptError, match=message):
        KnowledgeRepository.load(path)
