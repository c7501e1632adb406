"""zsRE in the MEND/ROME layout: ``zsre_mend_eval.json``, ``zsre_mend_train.json`` and EasyEdit's variants.

One record::

    {"subject": "IAAF Combined Events Challenge",
     "src": "When was the inception of IAAF Combined Events Challenge?",   # the edit prompt
     "alt": "2006",                                                      # the new target
     "answers": ["1998"], "pred": "2011",                                # true answer(s), a model's guess
     "rephrase": "When was the IAAF Combined Events Challenge launched?",
     "loc": "nq question: what is the name of the last episode of spongebob", "loc_ans": "The String",
     "cond": "2011 >> 2006 || When was ...",
     "portability": {"New Question": ..., "New Answer": ..., "Recalled Relation": ...}}   # EasyEdit only

``loc``/``loc_ans`` are absent from EasyEdit's portability files (``zsre_inverse_relation`` with an
``inverse question`` whose answer is the subject, ``zsre_subject_replace`` with an
``alter_subject_question`` about an alias of the subject); those become portability probes.
"""
from __future__ import annotations

from pathlib import Path

from recipe.data.common import ProbeSet, Record, convert
from recipe.types import EditCase, EditRequest


def zsre_case(record: Record, dataset: str) -> EditCase:
    """One MEND/ROME-layout zsRE record -> an ``EditCase`` (case id ``<dataset>/<index>``)."""
    answers = record.answers("answers", required=False)
    request = EditRequest(
        prompt=record.text("src"),
        target_new=record.text("alt"),
        subject=record.text("subject"),
        target_true=answers[0] if answers else None,
    )
    probes = ProbeSet()
    probes.add("generality", record.get("rephrase", str), request.target_new, "rephrase")
    if record.has("loc") or record.has("loc_ans"):
        probes.add("locality", record.get("loc", str), record.get("loc_ans", str), "locality")
    meta = {"answers": answers, "pred": record.optional_text("pred"), "cond": record.optional_text("cond")}
    if record.has("portability"):
        portability = record.child("portability")
        question = portability.get("New Question", str, required=False)
        probes.add("portability", question, portability.answers("New Answer", required=False), "portability")
        meta["recalled_relation"] = portability.optional_text("Recalled Relation")
    if record.has("inverse question"):
        probes.add("portability", record.get("inverse question", str), request.subject, "inverse_relation")
    if record.has("alter_subject_question"):
        question = record.get("alter_subject_question", str)
        probes.add("portability", question, request.target_new, "subject_replace")
        meta["alternative_subject"] = record.optional_text("alternative_subject")
    meta["skipped_probes"] = probes.skipped
    return EditCase(
        case_id=f"{dataset}/{record.index}",
        dataset=dataset,
        requests=(request,),
        meta=meta,
        **probes.case_fields(),
    )


def load_zsre(path: str | Path, dataset: str = "zsre", limit: int | None = None) -> list[EditCase]:
    """Every record of a MEND/ROME-layout zsRE file (``.json`` or ``.json.xz``)."""
    return convert(Path(path), limit, lambda record: zsre_case(record, dataset))
