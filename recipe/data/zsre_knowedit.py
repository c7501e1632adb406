"""zsRE in the KnowEdit layout (``ZsRE-test-all.json``), and the zsRE training split carved out of it.

One record::

    {"subject": "Epaspidoceras", "prompt": "Which family does Epaspidoceras belong to?",
     "target_new": "Noctuidae", "ground_truth": ["Aspidoceratidae"],
     "rephrase_prompt": "What family are Epaspidoceras?", "cond": "...",
     "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is",
                                            "ground_truth": ["genus"]}]},
     "portability": {"Reasoning": [{"prompt": "...", "ground_truth": "Owlet moths"}]}}

About 60% of these records are also in the MEND-layout evaluation file. ``zsre-train`` keeps only the
records that share neither the question (``prompt`` vs ``src``) nor the subject with it, so a model
trained on them has seen no evaluation fact and no evaluation entity.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from recipe.data.common import ProbeSet, Record, convert, knowedit_request
from recipe.data.zsre import load_zsre
from recipe.errors import RecipeError
from recipe.types import EditCase


def knowedit_zsre_case(record: Record, dataset: str) -> EditCase:
    """One KnowEdit zsRE record -> an ``EditCase`` (case id ``<dataset>/<index in the file>``)."""
    request = knowedit_request(record)
    truths = record.answers("ground_truth", required=False)
    probes = ProbeSet()
    probes.add("generality", record.get("rephrase_prompt", str, required=False), request.target_new, "rephrase")
    for section, kind in (("locality", "locality"), ("portability", "portability")):
        if not record.has(section):
            continue
        groups = record.child(section)
        for group in groups.value:
            for probe in groups.children(group):
                probes.add(kind, probe.get("prompt", str), probe.answers("ground_truth"), group)
    return EditCase(
        case_id=f"{dataset}/{record.index}",
        dataset=dataset,
        requests=(request,),
        meta={"answers": truths, "cond": record.optional_text("cond"), "skipped_probes": probes.skipped},
        **probes.case_fields(),
    )


def load_zsre_knowedit(path: str | Path, dataset: str = "zsre-knowedit", limit: int | None = None) -> list[EditCase]:
    """Every record of a KnowEdit-layout zsRE file."""
    return convert(Path(path), limit, lambda record: knowedit_zsre_case(record, dataset))


def _prompts(cases: Sequence[EditCase]) -> set[str]:
    return {request.prompt.strip() for case in cases for request in case.requests}


def _subjects(cases: Sequence[EditCase]) -> set[str]:
    return {request.subject.strip().casefold() for case in cases for request in case.requests if request.subject}


def zsre_overlap(train: Sequence[EditCase], evaluation: Sequence[EditCase]) -> dict[str, set[str]]:
    """The edit prompts and the (case-folded) subjects two case lists share; both sets empty = disjoint."""
    return {"prompts": _prompts(train) & _prompts(evaluation), "subjects": _subjects(train) & _subjects(evaluation)}


def load_zsre_train(
    knowedit_path: str | Path, eval_path: str | Path, dataset: str = "zsre-train", limit: int | None = None
) -> list[EditCase]:
    """The KnowEdit zsRE records whose question and subject are both absent from the evaluation file.

    ``eval_path`` is the MEND-layout evaluation file. Case ids keep the record's index in the KnowEdit
    file. The result is checked with ``zsre_overlap`` before it is returned.
    """
    evaluation = load_zsre(eval_path, "zsre")
    eval_prompts, eval_subjects = _prompts(evaluation), _subjects(evaluation)
    train = [
        case for case in load_zsre_knowedit(knowedit_path, dataset)
        if not _prompts([case]) & eval_prompts and not _subjects([case]) & eval_subjects
    ]
    shared = zsre_overlap(train, evaluation)
    if shared["prompts"] or shared["subjects"]:  # cannot happen by construction; kept as the proof
        raise RecipeError(f"zsRE train split overlaps the evaluation file: {shared}")
    return train if limit is None else train[:limit]
