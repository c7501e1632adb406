"""The five general-ability sets: their items, prompts and scores (MMLU, CommonsenseQA, ANLI, SQuAD 2.0,
WikiText); :mod:`recipe.eval.general` measures them before and after lifelong editing.

Scored as RECIPE's ``evaluation/llm_general_eval.py`` scores them (see ``<data_dir>/general/README.md``):

- MMLU, CommonsenseQA, ANLI: zero-shot multiple choice. The prompt is an instruction, the question and
  the options lettered ``A.`` ``B.`` ... and ends in ``Answer:``; the prediction is the option whose
  FIRST answer token (``" A"``, ``" B"``, ... as ``lm.target_ids`` writes it) has the largest logit at
  the answer position. ANLI's three labels are lettered options too (RECIPE scores the label words), so
  one scorer serves every set; its rounds r1/r2/r3 are reported separately and pooled.
- SQuAD 2.0: mean over questions of 1/perplexity, ``exp(mean log p)``, of the first gold answer ("N/A"
  when unanswerable) after title, context and question.
- WikiText-2 test: token-weighted perplexity of paragraphs. The first ``PROMPT_WORDS`` words are the
  prompt (all a prefix provider such as RECIPE's retrieval sees), the rest is the scored continuation.

Each headline number comes with ``ci95``, a percentile bootstrap 95% interval over the items
(``BOOTSTRAP_RESAMPLES`` resamples, seed 0: the same items give the same interval); the multiple-choice
sets also give ``chance``, the accuracy of guessing (the mean of 1 / number of options).

Every prompt + answer is at most ``max_tokens`` tokens: a longer SQuAD context is cut to a window
centred on the (plausible) answer, a longer MMLU/ANLI question loses its start, a longer WikiText
paragraph its end. Everything runs through :class:`EditedLM`, so prefix editors (RECIPE) see each
prompt as in real use and weight editors act through the changed weights.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import bootstrap
from tqdm.auto import tqdm

from recipe.data.common import DatasetFormatError, Record, find_file, read_text
from recipe.data.registry import DATA_DIR_ENV, load_wikitext
from recipe.errors import RecipeError
from recipe.lm import EditedLM

LETTERS = "ABCDEFGHIJ"
CHOICE_INSTRUCTION = "Choose the correct answer to the question."
ANLI_LABELS = ("entailment", "neutral", "contradiction")
SQUAD_INSTRUCTION = "Read the context and answer the question. If it has no answer, reply N/A."
NO_ANSWER = "N/A"
PROMPT_WORDS = 8  # WikiText: words of each paragraph given as the prompt, not scored
BOOTSTRAP_RESAMPLES = 1000  # resamples of each 95% interval
SOURCE = (f"the shared data folder's general/ (its README.md says where each file comes from); pass --data-dir "
          f"or set ${DATA_DIR_ENV} to the folder that holds general/ and wikitext/")


@dataclass(frozen=True)
class Choice:
    """One multiple-choice question; the prompt lists ``options`` lettered A, B, ..."""

    question: str  # everything before the options (ANLI: premise, hypothesis and the question)
    options: tuple[str, ...]
    answer: int  # index into options
    group: str = ""  # reported separately when a set has several groups (the ANLI round)
    instruction: str = CHOICE_INSTRUCTION


@dataclass(frozen=True)
class Reading:
    """One SQuAD 2.0 question; ``answer`` is "N/A" when the context does not answer it."""

    title: str
    context: str
    question: str
    answer: str
    answer_start: int | None  # character offset of the (plausible) answer in context
    answerable: bool = True


# ---- prompts -----------------------------------------------------------------------------------
def fit_tokens(lm: EditedLM, text: str, budget: int, keep: str | int = "start") -> str:
    """``text`` cut to at most ``budget`` tokens, keeping its "start", its "end", or a window centred
    on the character offset ``keep``."""
    offsets = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= budget:
        return text
    if budget < 1:
        raise RecipeError(f"max_tokens leaves no room for the text {text[:40]!r}...; raise --max-tokens")
    if keep == "start":
        start = 0
    elif keep == "end":
        start = len(offsets) - budget
    else:
        centre = next((i for i, (_, end) in enumerate(offsets) if end > keep), len(offsets) - 1)
        start = min(max(centre - budget // 2, 0), len(offsets) - budget)
    return text[offsets[start][0]:offsets[start + budget - 1][1]].strip()


def _fill(lm: EditedLM, template: Callable[[str], str], text: str, answer: str, max_tokens: int,
          keep: str | int) -> str:
    """``template(text)``, with ``text`` cut so that prompt + answer take at most ``max_tokens`` tokens."""
    room = max_tokens - len(lm.prompt_ids(template(""))) - len(lm.target_ids(answer))
    for slack in (2, 8, 32):  # a cut text can tokenise a little differently in place
        prompt = template(fit_tokens(lm, text, room - slack, keep))
        if len(lm.prompt_ids(prompt)) + len(lm.target_ids(answer)) <= max_tokens:
            return prompt
    raise RecipeError(f"cannot fit {text[:40]!r}... into {max_tokens} tokens")


def choice_prompt(lm: EditedLM, item: Choice, max_tokens: int) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, item.options))
    return _fill(lm, lambda q: f"{item.instruction}\n{q}\n{options}\nAnswer:", item.question, LETTERS[0],
                 max_tokens, keep="end")


def squad_prompt(lm: EditedLM, item: Reading, max_tokens: int) -> str:
    def template(context: str) -> str:
        return f"{SQUAD_INSTRUCTION}\nTitle: {item.title}\nContext: {context}\nQuestion: {item.question}\nAnswer:"

    keep = "start" if item.answer_start is None else item.answer_start
    return _fill(lm, template, item.context, item.answer, max_tokens, keep)


def wikitext_pair(lm: EditedLM, paragraph: str, max_tokens: int) -> tuple[str, str]:
    """(prompt, continuation): the first ``PROMPT_WORDS`` words, then the rest cut to fit ``max_tokens``."""
    words = paragraph.split()
    prompt, rest = " ".join(words[:PROMPT_WORDS]), " ".join(words[PROMPT_WORDS:])
    if not rest:
        raise RecipeError(f"WikiText paragraph of {len(words)} words has nothing after its prompt")
    return prompt, fit_tokens(lm, rest, max_tokens - len(lm.prompt_ids(prompt)) - 2, keep="start")


# ---- scoring -----------------------------------------------------------------------------------
def _batches(order: list[int], size: int, desc: str, progress: bool):
    chunks = [order[s:s + size] for s in range(0, len(order), size)]
    return tqdm(chunks, desc=desc, disable=not progress, leave=False)


def _option_ids(lm: EditedLM, n_options: int) -> list[int]:
    ids = [lm.target_ids(letter)[0] for letter in LETTERS[:n_options]]
    if len(set(ids)) != len(ids):
        raise RecipeError(f"option letters share a first token under this tokenizer: {ids}")
    return ids


@torch.no_grad()
def choice_predictions(lm: EditedLM, items: Sequence[Choice], max_tokens: int = 512,
                       progress: bool = False) -> list[int]:
    """The index of the option whose first answer token has the largest logit after each prompt."""
    prompts = [choice_prompt(lm, it, max_tokens) for it in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    preds = [0] * len(items)
    for batch in _batches(order, lm.max_batch, "multiple choice", progress):
        embeds, mask, pos = lm.embed([prompts[i] for i in batch])  # (B, T, H), (B, T), (B, T)
        logits = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                          use_cache=False).logits[:, -1].float()  # (B, V): left padding puts "Answer:" last
        for row, i in enumerate(batch):
            preds[i] = int(logits[row, _option_ids(lm, len(items[i].options))].argmax())
    return preds


def score_choices(lm: EditedLM, items: Sequence[Choice], max_tokens: int = 512, progress: bool = False) -> dict:
    """``accuracy`` (and ``accuracy/<group>`` when the items come in several groups), ``n``."""
    hits = [float(p == it.answer) for p, it in zip(choice_predictions(lm, items, max_tokens, progress), items)]
    out = {"accuracy": _mean(hits), "n": len(items), "ci95": ci95(np.mean, hits),
           "chance": _mean([1 / len(it.options) for it in items])}
    groups = sorted({it.group for it in items})
    if len(groups) > 1:
        for g in groups:
            out[f"accuracy/{g}"] = _mean([h for h, it in zip(hits, items) if it.group == g])
    return out


def _teacher_forced(lm: EditedLM, prompts: list[str], targets: list[str], desc: str, progress: bool):
    """``lm.score`` of every (prompt, target) in batches of similar length, in the input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    scores = [None] * len(prompts)
    for batch in _batches(order, lm.max_batch, desc, progress):
        for i, s in zip(batch, lm.score([prompts[i] for i in batch], [targets[i] for i in batch])):
            scores[i] = s
    return scores


def score_squad(lm: EditedLM, items: Sequence[Reading], max_tokens: int = 512, progress: bool = False) -> dict:
    """``inv_ppl``: mean of 1/perplexity = exp(mean log p) of the gold answer; also per answerability."""
    prompts = [squad_prompt(lm, it, max_tokens) for it in items]
    scores = _teacher_forced(lm, prompts, [it.answer for it in items], "squad", progress)
    inv = [math.exp(sum(s.logprobs) / len(s.logprobs)) for s in scores]
    return {"inv_ppl": _mean(inv), "n": len(items), "ci95": ci95(np.mean, inv),
            "inv_ppl/answerable": _mean([v for v, it in zip(inv, items) if it.answerable]),
            "inv_ppl/unanswerable": _mean([v for v, it in zip(inv, items) if not it.answerable])}


def score_wikitext(lm: EditedLM, items: Sequence[str], max_tokens: int = 512, progress: bool = False) -> dict:
    """``ppl``: exp of the token-weighted mean NLL of the continuations; ``tokens`` scored."""
    prompts, targets = zip(*(wikitext_pair(lm, p, max_tokens) for p in items))
    scores = _teacher_forced(lm, list(prompts), list(targets), "wikitext", progress)
    tokens = sum(len(s.logprobs) for s in scores)
    nll = -sum(sum(s.logprobs) for s in scores)
    interval = ci95(lambda n, t: np.exp(np.sum(n) / np.sum(t)), [-sum(s.logprobs) for s in scores],
                    [len(s.logprobs) for s in scores])
    return {"ppl": math.exp(nll / tokens), "tokens": tokens, "n": len(items), "ci95": interval}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def ci95(statistic: Callable, *samples: Sequence[float]) -> list[float] | None:
    """Percentile bootstrap 95% interval ``[low, high]`` of ``statistic`` over items (several samples:
    paired, resampled together); None for fewer than two items."""
    if len(samples[0]) < 2:
        return None
    res = bootstrap([np.asarray(x, dtype=float) for x in samples], statistic, paired=len(samples) > 1,
                    vectorized=False, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95,
                    method="percentile", rng=np.random.default_rng(0))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


# ---- data --------------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[Record]:
    records = []
    for i, line in enumerate(read_text(path).split("\n")):  # not splitlines(): texts hold U+2028
        if line.strip():
            try:
                records.append(Record(json.loads(line), path, i))
            except json.JSONDecodeError as err:
                raise DatasetFormatError(path, i, None, f"is not valid JSON: {err}") from err
    return records


def load_mmlu(root: Path) -> list[Choice]:
    out = []
    for r in _jsonl(find_file(root, "general/mmlu/mmlu_test.hf.jsonl", SOURCE)):
        options = tuple(str(c) for c in r.get("choices", list))
        answer = r.get("answer", int)
        if not 0 <= answer < len(options) <= len(LETTERS):
            raise r.error("answer", f"is {answer} for {len(options)} choices")
        out.append(Choice(r.text("question"), options, answer))  # pooled over subjects, as RECIPE reports it
    return out


def load_csqa(root: Path) -> list[Choice]:
    out = []
    for r in _jsonl(find_file(root, "general/csqa/dev_rand_split.jsonl", SOURCE)):
        choices = r.child("choices")
        labels, texts = choices.get("label", list), tuple(choices.get("text", list))
        if r.text("answerKey") not in labels or len(labels) != len(texts):
            raise r.error("answerKey", f"{r.value['answerKey']!r} is not one of the labels {labels}")
        out.append(Choice(r.text("question"), texts, labels.index(r.value["answerKey"])))
    return out


def load_anli(root: Path) -> list[Choice]:
    out = []
    for r in _jsonl(find_file(root, "general/anli/test.jsonl", SOURCE)):
        if r.text("label") not in ANLI_LABELS:
            raise r.error("label", f"is {r.value['label']!r}, expected one of {ANLI_LABELS}")
        question = (f"Premise: {r.text('premise')}\nHypothesis: {r.text('hypothesis')}\n"
                    "Does the premise entail the hypothesis, contradict it, or neither (neutral)?")
        out.append(Choice(question, ANLI_LABELS, ANLI_LABELS.index(r.value["label"]),
                          group=r.text("tag").split("_")[0], instruction="Answer the question."))
    return out


def load_squad(root: Path) -> list[Reading]:
    path = find_file(root, "general/squad/dev-v2.0.json", SOURCE)
    try:
        articles = json.loads(read_text(path))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetFormatError(path, None, "data", f"is not SQuAD's official JSON layout: {err}") from err
    if not isinstance(articles, list):
        raise DatasetFormatError(path, None, "data", f"is a {type(articles).__name__}, expected a list")
    out = []
    for a, article in enumerate(articles):
        art = Record(article, path, a)
        for par in art.children("paragraphs"):
            for qa in par.children("qas"):
                gold = qa.children("answers", required=False)
                spans = gold or qa.children("plausible_answers", required=False)
                out.append(Reading(art.text("title").replace("_", " "), par.text("context"), qa.text("question"),
                                   gold[0].text("text") if gold else NO_ANSWER,
                                   spans[0].get("answer_start", int) if spans else None, answerable=bool(gold)))
    return out


def load_wikitext_test(root: Path) -> list[str]:
    return load_wikitext(root, "test", min_words=2 * PROMPT_WORDS)
