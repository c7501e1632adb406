"""KnowledgeRepository index kinds (flat / ivf / auto), the block prompt store and the file format."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import safetensors.torch
import torch

import recipe.retrieval.key_index as key_index
from recipe.retrieval import KnowledgeRepository, RepositoryCorruptError, RepositoryInputError
from recipe.retrieval.prompt_store import PromptStore
from recipe.retrieval.repository import META_FILE, TENSOR_FILE
from recipe.storage import reseal, sha256_file
from recipe.retrieval.tensor_file import TensorFile, write

D, L, H = 16, 3, 8


def clustered_keys(n: int, seed: int = 0, centres: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, D)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, D)).astype(np.float32)  # (n, D)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def prompts(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, L, H, generator=torch.Generator().manual_seed(seed))  # (n, L, H)


def build(kind: str, n: int, batch: int = 250, **kwargs) -> tuple[KnowledgeRepository, np.ndarray, torch.Tensor]:
    repo = KnowledgeRepository(D, (L, H), index=kind, info={"t": 1}, **kwargs)
    keys, values = clustered_keys(n), prompts(n)
    for s in range(0, n, batch):
        repo.add(keys[s:s + batch], values[s:s + batch])
    return repo, keys, values


def test_ivf_trains_from_ivf_min_keys_and_retrains_as_it_grows():
    repo, keys, _ = build("ivf", 900)
    assert not repo.is_approximate  # too few keys to train on: exact
    repo.add(clustered_keys(300, seed=1), prompts(300, seed=1))
    assert repo.is_approximate and repo._index.trained_at >= key_index.IVF_MIN_KEYS
    first = repo._index.trained_at
    repo.add(clustered_keys(4 * first, seed=2), prompts(4 * first, seed=2))
    assert repo.is_approximate and repo._index.trained_at >= key_index.RETRAIN_GROWTH * first
    assert len(repo) == repo._index.ntotal == 1200 + 4 * first
    np.testing.assert_array_equal(repo.keys()[:900], keys)  # keys() stays in insertion order


@pytest.mark.parametrize("kind", ["flat", "ivf", "auto"])
def test_kinds_add_search_remove_save_load_round_trip(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(key_index, "AUTO_IVF_KEYS", 1500)
    repo, keys, values = build(kind, 3000)
    assert repo.is_approximate == (kind != "flat")
    queries = keys[:400] + 0.05 * clustered_keys(400, seed=7)  # (400, D) near keys 0..399
    _, ids = repo.search(queries, k=1)
    assert (ids[:, 0] == np.arange(400)).mean() >= 0.95

    gone = list(range(0, 3000, 7))
    repo.remove(gone[:-5])
    for i in gone[-5:]:  # single removals too
        repo.remove([i])
    _, ids = repo.search(keys, k=5)  # every stored key as a query
    assert not np.isin(ids, gone).any()
    kept = [i for i in range(3000) if i % 7]
    assert repo.ids() == kept and len(repo) == len(kept)
    np.testing.assert_array_equal(repo.keys(), keys[kept])
    np.testing.assert_array_equal(repo.keys([13, 1]), keys[[13, 1]])
    assert torch.equal(repo.get_prompts([13, 1]), values[[13, 1]])

    before = repo.search(queries, k=3)
    loaded = KnowledgeRepository.load(repo.save(tmp_path / "r"))
    assert loaded.index_kind == kind and loaded.ids() == kept and loaded.is_approximate == repo.is_approximate
    assert loaded._index.nlist == repo._index.nlist and loaded._index.trained_at == repo._index.trained_at
    after = loaded.search(queries, k=3)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(loaded.keys(), keys[kept])
    assert torch.equal(loaded.get_prompts(kept), values[kept])
    assert loaded.add(clustered_keys(1, seed=9), prompts(1)) == [3000]


def test_ivf_with_every_list_probed_is_exact():
    ivf, keys, _ = build("ivf", 3000)
    flat, _, _ = build("flat", 3000)
    ivf.nprobe = ivf._index.nlist
    queries = clustered_keys(200, seed=3)
    np.testing.assert_array_equal(ivf.search(queries, k=4)[1], flat.search(queries, k=4)[1])
    np.testing.assert_allclose(ivf.search(queries, k=4)[0], flat.search(queries, k=4)[0], rtol=1e-5)


def test_ivf_back_to_flat_when_it_shrinks_and_id_reuse():
    repo, keys, _ = build("ivf", 2000)
    assert repo.is_approximate
    repo.remove(range(1600))  # 400 left < IVF_MIN_KEYS / 2
    assert not repo.is_approximate
    np.testing.assert_array_equal(repo.keys(), keys[1600:])
    np.testing.assert_array_equal(repo.search(keys[1600:], k=1)[1][:, 0], np.arange(1600, 2000))
    repo.add(keys[:2], prompts(2), ids=[5, 7])  # removed ids may be given again explicitly
    assert repo.ids()[-2:] == [5, 7] and repo.search(keys[:2], k=1)[1][:, 0].tolist() == [5, 7]


def test_load_can_override_the_index_kind(tmp_path):
    repo, keys, _ = build("ivf", 3000)
    path = repo.save(tmp_path / "r")
    flat = KnowledgeRepository.load(path, index="flat")
    assert not flat.is_approximate and flat.index_kind == "flat"
    reference, _, _ = build("flat", 3000)
    queries = clustered_keys(100, seed=5)
    np.testing.assert_array_equal(flat.search(queries, k=3)[1], reference.search(queries, k=3)[1])


def test_prompts_are_stored_in_prompt_dtype(tmp_path):
    repo, _, values = build("flat", 300, prompt_dtype="float16")
    stored = repo.get_prompts(range(300))
    assert stored.dtype == torch.float32 and torch.equal(stored, values.half().float())
    assert repo.nbytes()["prompts"] >= 300 * L * H * 2
    loaded = KnowledgeRepository.load(repo.save(tmp_path / "r"))
    assert torch.equal(loaded.get_prompts(range(300)), stored)  # float16 round trips bit-exactly too
    with pytest.raises(RepositoryInputError, match="overflow"):
        repo.add(clustered_keys(1), torch.full((1, L, H), 1e6))
    assert len(repo) == 300


def test_prompt_store_reuses_rows_and_compacts_in_order():
    store = PromptStore((L, H), torch.float32, block_rows=16)
    values = prompts(100)
    store.add(list(range(100)), values)
    store.remove(list(range(0, 100, 2)))
    store.add([200, 201], values[:2])  # into freed rows
    assert store.capacity == 112 and store.ids() == [*range(1, 100, 2), 200, 201]
    store.remove(list(range(1, 90, 2)))  # now more than half the rows are free: compaction
    assert store.capacity <= 16 and store.ids() == [91, 93, 95, 97, 99, 200, 201]
    assert torch.equal(store.get([93, 201, 99]), torch.stack([values[93], values[1], values[99]]))


def test_search_sets_the_blas_threshold_in_queries_times_dim():
    repo, keys, _ = build("flat", 50)
    faiss.cvar.distance_compute_blas_threshold = 7
    repo.search(keys[:2])
    assert faiss.cvar.distance_compute_blas_threshold == 4 * D
    KnowledgeRepository(D, (L, H), blas_min_queries=None).search(keys[:1])
    assert faiss.cvar.distance_compute_blas_threshold == 4 * D


def test_tensor_file_is_safetensors_and_streams(tmp_path):
    repo, keys, values = build("ivf", 2000, prompt_dtype="bfloat16")
    path = repo.save(tmp_path / "r")
    plain = safetensors.torch.load_file(str(path / TENSOR_FILE))
    assert set(plain) == {"ids", "keys", "prompts", "ivf_centroids", "ivf_lists"}
    assert plain["prompts"].dtype == torch.bfloat16 and torch.equal(plain["prompts"].float(), repo.get_prompts(repo.ids()))
    with TensorFile(path / TENSOR_FILE) as f:
        np.testing.assert_array_equal(f.read("keys", 10, 20).numpy(), keys[10:20])
        assert torch.equal(f.read("prompts", 5, 6), plain["prompts"][5:6])


def test_a_repository_without_manifest_is_refused_clearly(tmp_path):
    keys, values = clustered_keys(20), prompts(20)
    (tmp_path / "old").mkdir()
    tensors = {"keys": torch.from_numpy(keys), "prompts": values, "ids": torch.arange(20, dtype=torch.int64)}
    safetensors.torch.save_file(tensors, str(tmp_path / "old" / TENSOR_FILE))
    meta = {"format": "recipe.knowledge_repository", "format_version": 1, "key_dim": D, "prompt_shape": [L, H],
            "prompt_dtype": "float32", "count": 20, "next_id": 25, "info": {}, "tensor_file": TENSOR_FILE,
            "sha256": sha256_file(tmp_path / "old" / TENSOR_FILE)}
    (tmp_path / "old" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(RepositoryCorruptError, match="manifest.json is missing"):  # its JSON is covered by no checksum
        KnowledgeRepository.load(tmp_path / "old")


def test_out_of_range_ivf_lists_are_corrupt(tmp_path):
    repo, _, _ = build("ivf", 2000)
    path = repo.save(tmp_path / "r")
    with TensorFile(path / TENSOR_FILE) as f:
        tensors = {name: f.read(name) for name in f.entries}
    tensors["ivf_lists"][3] = 10_000
    write(path / TENSOR_FILE, tensors, {"format": "recipe.knowledge_repository"})
    reseal(path)  # a consistent manifest: the range check must catch it
    with pytest.raises(RepositoryCorruptError, match="IVF"):
        KnowledgeRepository.load(path)


def test_bad_index_options_raise():
    with pytest.raises(RepositoryInputError):
        KnowledgeRepository(D, (L, H), index="hnsw")
    with pytest.raises(RepositoryInputError):
        KnowledgeRepository(D, (L, H), nprobe=0)


def test_a_fork_shares_blocks_until_either_store_writes():
    store = PromptStore((L, H), torch.float32, block_rows=4)
    values = prompts(10)
    store.add(list(range(10)), values)  # blocks of 4 rows: 3 blocks
    fork = store.fork()
    assert all(a is b for a, b in zip(fork._blocks, store._blocks))  # nothing copied
    store.remove([1, 2])
    store.add([10, 11, 12], prompts(3, seed=1))  # reuses rows 1 and 2 (block 0), then row 10 (block 2)
    assert store._blocks[0] is not fork._blocks[0] and store._blocks[1] is fork._blocks[1]
    assert torch.equal(torch.cat(list(fork.chunks(3))), values)  # the fork still holds the prompts at fork time
    assert fork.ids() == list(range(10))
    fork.add([99], prompts(1, seed=2))  # the fork copies before writing, too
    assert torch.equal(store.get([0, 3, 10]), torch.cat([values[[0, 3]], prompts(3, seed=1)[:1]]))
    assert torch.equal(fork.get([99]), prompts(1, seed=2))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_snapshot_saves_the_repository_as_it_was_while_it_changes(tmp_path, kind):
    repo, keys, values = build(kind, 1500)
    assert repo.is_approximate == (kind == "ivf")
    repo.remove(range(0, 1500, 7))
    kept = repo.ids()
    write = repo.snapshot()
    repo.remove(kept[:300])  # the live repository changes before the snapshot is written
    repo.add(clustered_keys(400, seed=5), prompts(400, seed=5))
    write(tmp_path / "snap")
    loaded = KnowledgeRepository.load(tmp_path / "snap")
    assert loaded.ids() == kept and loaded.is_approximate == (kind == "ivf")
    np.testing.assert_array_equal(loaded.keys(), keys[kept])
    assert torch.equal(loaded.get_prompts(kept), values[kept])
    # extra entries (an editor's superseded ones) are saved after the others, the index then flat
    repo.snapshot(info={"t": 2}, extra=([5000, 5001], clustered_keys(2, seed=8), prompts(2, seed=8)))(tmp_path / "x")
    again = KnowledgeRepository.load(tmp_path / "x", index="flat")
    assert again.ids() == repo.ids() + [5000, 5001] and again.info == {"t": 2}
    assert torch.equal(again.get_prompts([5000, 5001]), prompts(2, seed=8))
    assert again.add(clustered_keys(1, seed=9), prompts(1, seed=9)) == [5002]
