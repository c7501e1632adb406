"""MQuAKE (``MQuAKE-CF-3k.json``, ``MQuAKE-CF.json``, ``MQuAKE-T.json``, DeepEdit's ``MQuAKE-hard.json``).

One case edits a chain of facts and asks multi-hop questions whose answer follows from all the edits::

    {"case_id": 7417,
     "requested_rewrite": [{"prompt": "{} was performed by", "subject": "Hey Jude", "question": "...",
                            "target_new": {"str": "Madonna", "id": "Q1744"},
                            "target_true": {"str": "The Beatles", "id": "Q1299"}, "relation_id": "P175"}, ...],
     "questions": [3 x str],                        # multi-hop paraphrases -> generality, new_answer
     "answer": "English", "answer_alias": [...],   # the pre-edit multi-hop answer (kept in meta)
     "new_answer": "Arabic", "new_answer_alias": [...],
     "single_hops": [...], "new_single_hops": [{"question", "cloze", "answer", "answer_alias"}],
     "orig": {...}}

``new_single_hops`` (each hop of the new chain) become portability probes, group "single_hop".
Case ids are ``<dataset>/<record case_id>``.
"""
from __future__ import annotations

from pathlib import Path

from recipe.data.common import ProbeSet, Record, convert
from recipe.types import EditCase, EditRequest


def _request(rewrite: Record) -> EditRequest:
    subject, template = rewrite.text("subject"), rewrite.text("prompt")
    if "{}" not in template:
        raise rewrite.error("prompt", f"has no '{{}}' slot for the subject: {template!r}")
    return EditRequest(
        prompt=template.format(subject),
        target_new=rewrite.child("target_new").text("str"),
        subject=subject,
        target_true=rewrite.child("target_true").text("str"),
    )


def mquake_case(record: Record, dataset: str) -> EditCase:
    """One MQuAKE record -> an ``EditCase`` holding every requested rewrite of the chain."""
    requests = tuple(_request(rewrite) for rewrite in record.children("requested_rewrite"))
    if not requests:
        raise record.error("requested_rewrite", "is empty")
    new_answers = [record.text("new_answer"), *record.answers("new_answer_alias", required=False)]
    probes = ProbeSet()
    for i, question in enumerate(record.get("questions", list)):
        if not isinstance(question, str):
            raise record.error(f"questions[{i}]", f"is a {type(question).__name__}, expected a string")
        probes.add("generality", question, new_answers, "multi_hop")
    for hop in record.children("new_single_hops", required=False):
        answers = [hop.get("answer", str), *hop.answers("answer_alias", required=False)]
        probes.add("portability", hop.get("question", str), answers, "single_hop")
    meta = {
        "answer": record.optional_text("answer"),
        "answer_alias": record.answers("answer_alias", required=False),
        "skipped_probes": probes.skipped,
    }
    case_id = record.get("case_id", int, required=False)
    return EditCase(
        case_id=f"{dataset}/{record.index if case_id is None else case_id}",
        dataset=dataset,
        requests=requests,
        meta=meta,
        **probes.case_fields(),
    )


def load_mquake(path: str | Path, dataset: str = "mquake", limit: int | None = None) -> list[EditCase]:
    """Every record of an MQuAKE-layout file."""
    return convert(Path(path), limit, lambda record: mquake_case(record, dataset))
