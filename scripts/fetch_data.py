"""Download the public data files into a data folder and check each one's size and sha256.

    python scripts/fetch_data.py --dest data            # every file in recipe/data/sources.json
    python scripts/fetch_data.py --dest data --only zsre/zsre_mend_eval_portability_gpt4.json
    RECIPE_DATA_DIR=data recipe eval ...                 # the loaders then read the folder

Each file comes from a public GitHub repository at a pinned commit (the ``url`` of its entry). It is
written to a temporary file beside its destination and renamed into place only once its size and
sha256 match the entry, so a failed or tampered download leaves nothing behind. A file already in
place with the right hash is not downloaded again. The loaders never download; tests never call this.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[1] / "recipe" / "data" / "sources.json"
CHUNK = 1 << 20
log = logging.getLogger("fetch_data")


class FetchError(RuntimeError):
    """A download failed or did not match its pinned size and sha256."""


def load_sources(path: Path = SOURCES) -> list[dict]:
    """The entries of a sources file: name, url, size, sha256 (and where the file comes from)."""
    entries = json.loads(Path(path).read_text())["files"]
    for e in entries:
        missing = {"name", "url", "size", "sha256"} - set(e)
        if missing:
            raise ValueError(f"{path}: entry {e.get('name', e)!r} lacks {sorted(missing)}")
        if Path(e["name"]).is_absolute() or ".." in Path(e["name"]).parts:
            raise ValueError(f"{path}: entry name {e['name']!r} must be a relative path inside the data folder")
    return entries


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(entry: dict, dest: Path) -> Path:
    """Download one entry into ``dest / entry['name']``, verified; returns the path placed."""
    target = dest / entry["name"]
    if target.is_file() and target.stat().st_size == entry["size"] and sha256_of(target) == entry["sha256"]:
        log.info("%s: already in place, sha256 verified", entry["name"])
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry["url"], timeout=60) as response:
            for block in iter(lambda: response.read(CHUNK), b""):
                digest.update(block)
                size += len(block)
                out.write(block)
        if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
            raise FetchError(f"{entry['name']}: {entry['url']} gave {size} bytes with sha256 {digest.hexdigest()}, "
                             f"expected {entry['size']} bytes with sha256 {entry['sha256']}; nothing was placed")
        os.replace(tmp, target)
    except OSError as err:
        raise FetchError(f"{entry['name']}: could not download {entry['url']}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("%s: %d bytes, sha256 verified", entry["name"], entry["size"])
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, required=True, help="the data folder (RECIPE_DATA_DIR)")
    parser.add_argument("--sources", type=Path, default=SOURCES, help="the sources file (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    entries = load_sources(args.sources)
    if args.only:
        unknown = sorted(set(args.only) - {e["name"] for e in entries})
        if unknown:
            parser.error(f"unknown names {unknown}; known: {sorted(e['name'] for e in entries)}")
        entries = [e for e in entries if e["name"] in args.only]
    failed = []
    for entry in entries:
        try:
            fetch(entry, args.dest)
        except FetchError as err:
            log.error("%s", err)
            failed.append(entry["name"])
    if failed:
        log.error("%d of %d files failed: %s", len(failed), len(entries), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
