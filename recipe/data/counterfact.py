"""CounterFact, in EasyEdit's reduced layout (RECIPE's train/edit splits) and in ROME's full layout.

EasyEdit layout, one rephrase and one neighbourhood prompt per record::

    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}

ROME layout (``counterfact.json``)::

    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "relation_id": "P103", "target_new": {"str": "English", "id": "Q1860"},
                           "target_true": {"str": "French", "id": "Q150"}},
     "paraphrase_prompts": [2 x str],      # -> generality, target_new
     "neighborhood_prompts": [10 x str],   # other subjects whose true answer is target_true -> locality
     "attribute_prompts": [10 x str],      # other subjects whose true answer is target_new -> portability
     "generation_prompts": [10 x str]}     # free-text prompts, kept in meta

Case ids are ``<dataset>/<record case_id>`` (the ROME case id, shared by both layouts).
"""
from __future__ import annotations

from pathlib import Path

from recipe.data.common import ProbeSet, Record, convert
from recipe.types import EditCase, EditRequest


def counterfact_case(record: Record, dataset: str) -> EditCase:
    """One EasyEdit-layout CounterFact record -> an ``EditCase``."""
    request = EditRequest(
        prompt=record.text("prompt"),
        target_new=record.text("target_new"),
        subject=record.text("subject"),
        target_true=record.optional_text("ground_truth"),
    )
    probes = ProbeSet()
    probes.add("generality", record.get("rephrase_prompt", str), request.target_new, "rephrase")
    probes.add("locality", record.get("locality_prompt", str), record.get("locality_ground_truth", str), "neighborhood")
    case_id = record.get("case_id", int, required=False)
    return EditCase(
        case_id=f"{dataset}/{record.index if case_id is None else case_id}",
        dataset=dataset,
        requests=(request,),
        meta={"skipped_probes": probes.skipped},
        **probes.case_fields(),
    )


def counterfact_rome_case(record: Record, dataset: str) -> EditCase:
    """One ROME-layout CounterFact record -> an ``EditCase``."""
    rewrite = record.child("requested_rewrite")
    subject, template = rewrite.text("subject"), rewrite.text("prompt")
    if "{}" not in template:
        raise rewrite.error("prompt", f"has no '{{}}' slot for the subject: {template!r}")
    target_new = rewrite.child("target_new").text("str")
    target_true = rewrite.child("target_true").text("str")
    request = EditRequest(template.format(subject), target_new, subject=subject, target_true=target_true)
    probes = ProbeSet()
    for key, kind, group, target in (
        ("paraphrase_prompts", "generality", "rephrase", target_new),
        ("neighborhood_prompts", "locality", "neighborhood", target_true),
        ("attribute_prompts", "portability", "attribute", target_new),
    ):
        for i, prompt in enumerate(record.get(key, list, required=False) or []):
            if not isinstance(prompt, str):
                raise record.error(f"{key}[{i}]", f"is a {type(prompt).__name__}, expected a string")
            probes.add(kind, prompt, target, group)
    case_id = record.get("case_id", int, required=False)
    meta = {
        "relation_id": rewrite.optional_text("relation_id"),
        "target_new_id": rewrite.child("target_new").optional_text("id"),
        "target_true_id": rewrite.child("target_true").optional_text("id"),
        "pararel_idx": record.get("pararel_idx", int, required=False),
        "generation_prompts": list(record.get("generation_prompts", list, required=False) or []),
        "skipped_probes": probes.skipped,
    }
    return EditCase(
        case_id=f"{dataset}/{record.index if case_id is None else case_id}",
        dataset=dataset,
        requests=(request,),
        meta=meta,
        **probes.case_fields(),
    )


def load_counterfact(path: str | Path, dataset: str = "counterfact", limit: int | None = None) -> list[EditCase]:
    """Every record of an EasyEdit-layout CounterFact file (``counterfact-{train,edit}.json[.xz]``)."""
    return convert(Path(path), limit, lambda record: counterfact_case(record, dataset))


def load_counterfact_rome(
    path: str | Path, dataset: str = "counterfact-rome", limit: int | None = None
) -> list[EditCase]:
    """Every record of a ROME-layout CounterFact file (``counterfact.json`` or a subset of it)."""
    return convert(Path(path), limit, lambda record: counterfact_rome_case(record, dataset))
