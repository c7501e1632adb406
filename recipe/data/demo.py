"""A small set of our own hand-written counterfactual edits, shipped with the package (``demo.json``).

For smoke tests, examples and the CLI when no dataset folder is at hand. Each record::

    {"relation": "location", "subject": "Eiffel Tower",
     "prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome", "target_true": "Paris",
     "paraphrase": "The city where you can visit the Eiffel Tower is",
     "locality_prompt": "Big Ben is located in the city of", "locality_answer": "London"}

The subject always occurs verbatim in the prompt, and no locality answer equals the edit's new target.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from recipe.data.common import DatasetFormatError, ProbeSet, Record
from recipe.types import EditCase, EditRequest

DEMO_FILE = "demo.json"


def demo_case(record: Record, dataset: str) -> EditCase:
    request = EditRequest(
        prompt=record.text("prompt"),
        target_new=record.text("target_new"),
        subject=record.text("subject"),
        target_true=record.text("target_true"),
    )
    probes = ProbeSet()
    probes.add("generality", record.text("paraphrase"), request.target_new, "rephrase")
    probes.add("locality", record.text("locality_prompt"), record.text("locality_answer"), "locality")
    return EditCase(
        case_id=f"{dataset}/{record.index}",
        dataset=dataset,
        requests=(request,),
        meta={"relation": record.text("relation"), "skipped_probes": probes.skipped},
        **probes.case_fields(),
    )


def load_demo(dataset: str = "demo", limit: int | None = None) -> list[EditCase]:
    """The bundled demo edits; needs no data folder."""
    resource = resources.files(__package__).joinpath(DEMO_FILE)
    records = json.loads(resource.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise DatasetFormatError(Path(str(resource)), None, None, "top level is not a list")
    records = records if limit is None else records[:limit]
    return [demo_case(Record(value, Path(str(resource)), i), dataset) for i, value in enumerate(records)]
