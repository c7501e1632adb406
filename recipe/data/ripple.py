"""RippleEdits as KnowEdit ships it (``wiki_recent/recent_{train,test}.json``, ``wiki_counterfact/*_cf.json``).

One record::

    {"subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
     "ground_truth": "...",                                  # only in the counterfactual files
     "rephrase": "...",                                      # only in recent_test
     "portability": {"Logical_Generalization" | "Reasoning" | "Subject_Aliasing": [{"prompt", "ground_truth"}]},
     "locality": {"Relation_Specificity" | "Forgetfulness": [{"prompt", "ground_truth"}]}}

``ground_truth`` of a probe is a string, a list of strings, or a list of alias lists (one list per
correct answer): the first alias of the first answer becomes ``Probe.target``, all others aliases.
The ripple-effect groups measure whether the edit's consequences hold, so (as in RECIPE) they are
generality probes, named by group. The original RippleEdits files spell ``Relation_Specifity``.
Probes with an empty prompt or no answer are skipped and counted in ``meta["skipped_probes"]``.
"""
from __future__ import annotations

from pathlib import Path

from recipe.data.common import ProbeSet, Record, convert, knowedit_request
from recipe.types import EditCase

GENERALITY_GROUPS = ("Logical_Generalization", "Reasoning", "Subject_Aliasing")
LOCALITY_GROUPS = ("Relation_Specificity", "Forgetfulness")
GROUP_SPELLINGS = {"Relation_Specifity": "Relation_Specificity"}


def ripple_case(record: Record, dataset: str) -> EditCase:
    """One KnowEdit RippleEdits record -> an ``EditCase`` (case id ``<dataset>/<index>``)."""
    request = knowedit_request(record)
    truths = record.answers("ground_truth", required=False)
    probes = ProbeSet()
    if record.has("rephrase"):
        probes.add("generality", record.get("rephrase", str), request.target_new, "rephrase")
    other_groups: list[str] = []
    for section in ("portability", "locality"):
        if not record.has(section):
            continue
        groups = record.child(section)
        for key in groups.value:
            group = GROUP_SPELLINGS.get(key, key)
            if group in GENERALITY_GROUPS:
                kind = "generality"
            elif group in LOCALITY_GROUPS:
                kind = "locality"
            else:
                kind = section
                other_groups.append(group)
            for probe in groups.children(key):
                probes.add(kind, probe.get("prompt", str), probe.answers("ground_truth"), group)
    meta: dict = {"answers": truths, "skipped_probes": probes.skipped}
    if other_groups:
        meta["other_groups"] = other_groups
    if record.has("Knowledge_triplet"):
        meta["knowledge_triplet"] = record.get("Knowledge_triplet", dict)
    if record.has("Rephrased"):
        meta["rephrased_statements"] = record.get("Rephrased", dict)
    return EditCase(
        case_id=f"{dataset}/{record.index}",
        dataset=dataset,
        requests=(request,),
        meta=meta,
        **probes.case_fields(),
    )


def load_ripple(path: str | Path, dataset: str = "ripple", limit: int | None = None) -> list[EditCase]:
    """Every record of a KnowEdit RippleEdits file."""
    return convert(Path(path), limit, lambda record: ripple_case(record, dataset))
