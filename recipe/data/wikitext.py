"""WikiText-2 paragraphs: plain text for perplexity checks and ROME/MEMIT covariance statistics.

``test`` is the raw test split (``wiki.test.raw``: original tokens, CRLF line endings, one paragraph
per line); ``valid`` is the word-level valid split (``valid.txt``: rare words replaced by ``<unk>``).
Both keep WikiText's spacing (``@-@``, `` , ``). Headings (`` = Title = ``, `` = = Section = = ``) and
short lines (list items, captions) are dropped.
"""
from __future__ import annotations

from pathlib import Path

from recipe.data.common import find_file, read_text
from recipe.errors import RecipeError

WIKITEXT_FILES = {"test": "wikitext/wiki.test.raw", "valid": "wikitext/valid.txt"}
WIKITEXT_SOURCE = (
    "WikiText-2 (Salesforce/wikitext, wikitext-2-raw-v1 / pytorch/examples word_language_model/data/wikitext-2); "
    "see the data folder's MANIFEST.md"
)


def _is_heading(line: str) -> bool:
    return line.startswith("=") and line.endswith("=")


def wikitext_paragraphs(text: str, min_words: int = 10) -> list[str]:
    """Non-heading lines of ``text`` with at least ``min_words`` whitespace-separated words, stripped."""
    paragraphs = (line.strip() for line in text.splitlines())
    return [p for p in paragraphs if p and not _is_heading(p) and len(p.split()) >= min_words]


def load_wikitext_file(data_dir: Path, split: str = "test", min_words: int = 10) -> list[str]:
    """The paragraphs of one WikiText split found under ``data_dir``."""
    if split not in WIKITEXT_FILES:
        raise RecipeError(f"unknown WikiText split {split!r}; known: {', '.join(WIKITEXT_FILES)}")
    path = find_file(Path(data_dir), WIKITEXT_FILES[split], WIKITEXT_SOURCE)
    return wikitext_paragraphs(read_text(path), min_words)
