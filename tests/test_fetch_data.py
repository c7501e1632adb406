"""scripts/fetch_data.py against a local mirror (file:// URLs in a tmp folder), never the internet."""
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fetch_data", ROOT / "scripts" / "fetch_data.py")
fetch_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch_data)

PAYLOAD = b'[{"src": "Who wrote Hamlet?", "alt": "Marlowe"}]\n'


@pytest.fixture
def mirror(tmp_path):
    """A mirror folder with one file and a sources file pointing at it through a file:// URL."""
    (tmp_path / "mirror").mkdir()
    served = tmp_path / "mirror" / "zsre.json"
    served.write_bytes(PAYLOAD)

    def sources(sha256: str = hashlib.sha256(PAYLOAD).hexdigest(), size: int = len(PAYLOAD)) -> Path:
        path = tmp_path / "sources.json"
        path.write_text(json.dumps({"files": [{"name": "zsre/zsre.json", "url": served.as_uri(),
                                                "size": size, "sha256": sha256}]}))
        return path
    return sources


def test_a_good_file_is_placed_and_verified(mirror, tmp_path):
    dest = tmp_path / "data"
    assert fetch_data.main(["--dest", str(dest), "--sources", str(mirror())]) == 0
    assert (dest / "zsre" / "zsre.json").read_bytes() == PAYLOAD
    assert [p.name for p in (dest / "zsre").iterdir()] == ["zsre.json"]  # no temporary file left


def test_a_bad_hash_is_an_error_and_nothing_is_placed(mirror, tmp_path):
    dest = tmp_path / "data"
    entry = fetch_data.load_sources(mirror(sha256="0" * 64))[0]
    with pytest.raises(fetch_data.FetchError, match="expected .* sha256 0{64}; nothing was placed"):
        fetch_data.fetch(entry, dest)
    assert list((dest / "zsre").iterdir()) == []
    assert fetch_data.main(["--dest", str(dest), "--sources", str(mirror(size=3))]) == 1
    assert list((dest / "zsre").iterdir()) == []


def test_a_file_in_place_is_not_downloaded_again(mirror, tmp_path):
    dest = tmp_path / "data"
    (dest / "zsre").mkdir(parents=True)
    (dest / "zsre" / "zsre.json").write_bytes(PAYLOAD)
    sources = mirror()
    (tmp_path / "mirror" / "zsre.json").unlink()  # the mirror is gone: only the local copy can pass
    assert fetch_data.main(["--dest", str(dest), "--sources", str(sources)]) == 0


def test_names_that_leave_the_data_folder_are_refused(tmp_path):
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"files": [{"name": "../x.json", "url": "file:///x", "size": 1, "sha256": "0"}]}))
    with pytest.raises(ValueError, match="relative path inside the data folder"):
        fetch_data.load_sources(path)


def test_the_shipped_sources_pin_a_commit_size_and_sha256_per_file():
    entries = fetch_data.load_sources()
    assert len(entries) == len({e["name"] for e in entries}) >= 20
    for e in entries:
        assert re.fullmatch(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/.+", e["url"]), e["url"]
        assert e["commit"] in e["url"] and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) and e["size"] > 0
    names = {e["name"] for e in entries}
    assert {"zsre/zsre_mend_eval_portability_gpt4.json", "counterfact/counterfact-edit.json"} <= names
