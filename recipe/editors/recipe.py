"""RECIPE: retrieval-augmented continuous prompt learning (Chen et al. 2024), lifelong and undoable.

Editing never touches the LM. Each edit's knowledge statement ``prompt + " " + target_new``
(normalised and bounded in length, ``recipe.retrieval.statements``) becomes a key r_k (knowledge
head) and a continuous prompt (prompt encoder), stored in a FAISS ``KnowledgeRepository``; the rest
of the edit is one ``EditRecord``. At inference ``lm.prefix_provider`` encodes the QUESTION ONLY
(r_q, query head), takes the top-1 entry and returns what to prepend (a ``Prefix``: its prompt
vectors and statement tokens) when the acceptance gates pass it (``recipe.retrieval.gates``: the
Knowledge Sentinel's ``s(q, k) > s(q, r_s)``, then an optional verifier and subject gate);
otherwise it returns ``None`` and the LM computes exactly what the base model computes.

Prefix modes (``prefix_mode``): "vectors" is the paper's l learned vectors; "vectors+statement"
appends the LM's own token embeddings of the stored statement, so the frozen LM can copy answers it
never saw in training (open targets, FIELD_NOTES: "never seen" targets). The statement's token ids
are kept per edit and saved, so the prefix is rebuilt exactly after save/load.

Updates (``supersede``, on by default): an edit that restates a stored fact with another answer (the
same question key, or the same subject and a retrieval far above the sentinel's threshold; exactly as
defined in ``recipe.retrieval.updates``) supersedes it. The old entry leaves the
index but stays in ``records`` with ``superseded_by`` set (``superseded()`` lists them all), and
``remove()`` of the newer edit puts it back. ``last_superseded`` says what the latest ``edit()`` call
superseded. ``supersede: false`` keeps both entries, and which one answers depends on the wording.

Trained networks (``recipe.retrieval.networks``) come from ``checkpoint`` (an artefact written by ``train.recipe``, see
``recipe.artifacts``); with ``checkpoint: null`` they are randomly initialised under ``seed`` (fine for
tests and plumbing, useless for real edits).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, Sequence

import torch
from torch import Tensor

from recipe.artifacts import RECIPE, SHIPPED, load_recipe_artifact, load_verifier, shipped_checkpoint
from recipe.editors.base import Editor, EditorConfig, register_editor
from recipe.editors.recipe_saving import SavedEdits
from recipe.errors import IncompatibleError, RecipeError
from recipe.lm import EditedLM, Prefix
from recipe.retrieval.encoders import RecipeArchitecture
from recipe.retrieval.gates import Candidates, Gate, SentinelGate, SubjectGate, VerifierGate, apply_gates
from recipe.retrieval.key_index import IndexKind
from recipe.retrieval.networks import RecipeNetworks
from recipe.retrieval.repository import KnowledgeRepository
from recipe.retrieval.sentinel import SentinelMode
from recipe.retrieval.statements import (DEFAULT_SEPARATOR, EditRecord, make_records,
                                         normalise_statement, statement_token_bound)
from recipe.retrieval.updates import Shelf, after_removal, question_key
from recipe.types import EditId, EditRequest

log = logging.getLogger(__name__)

PrefixMode = Literal["vectors", "vectors+statement"]


@dataclass
class RecipeConfig(EditorConfig):
    checkpoint: str | None = None  # artefact folder from train.recipe; "shipped": the one made for the LM; None: random networks
    architecture: RecipeArchitecture = field(default_factory=RecipeArchitecture)  # used when checkpoint is None
    prefix_mode: PrefixMode = "vectors+statement"  # must equal the checkpoint's (the prompt encoder learned one)
    statement_separator: str | None = None  # text after the statement in the prefix; None: the checkpoint's
    sentinel_mode: SentinelMode = "learned"  # "fixed": one threshold for all queries (ablation)
    threshold: float = 0.0  # the fixed mode's threshold on s(q, k)
    sentinel_margin: float = 0.0  # accept only when s(q, k) > s(q, r_s) + margin (< 0: looser, e.g. with a verifier)
    verifier: str | None = None  # EditVerifier artefact (train.verifier) checking accepted entries; None: sentinel alone
    verifier_threshold: float | None = None  # use the entry when the verifier's p > this; None: the artefact's
    subject_gate: bool = False  # use an entry only when its edit's subject occurs in the query (case-insensitive)
    subject_gate_bypass: float | None = None  # with a verifier: a subject-less match still passes when p > this
    duplicates: Literal["error", "replace"] = "error"  # an edit whose statement is stored: refuse, or replace the entry
    supersede: bool = True  # an edit restating a stored question with another answer retires the old entry; False: keep both
    supersede_margin: float | None = None  # also restates: same subject, retrieves it with s(q,k) > s(q,r_s) + this (4.0 measured); None: off
    max_statement_tokens: int = 256  # longest statement in LM tokens (also at most half the LM's context); longer: refused
    refine_steps: int = 0  # Adam steps per edit on its own prompt vectors (not in the paper; 0 = RECIPE)
    refine_lr: float = 0.1  # their Adam learning rate, in units of the std of the LM's embeddings
    refine_stop_loss: float = 5.0e-2  # stop refining once the target NLL is below this
    batch_size: int = 64  # texts per encoder forward pass (edits and queries)
    counts: ClassVar[tuple[str, ...]] = ("batch_size",)
    use_gpu: bool | None = None  # FAISS index on a GPU; None: when faiss sees one
    prompt_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # prompts in RAM and on disk (float32: bit-exact)
    index: IndexKind = "auto"  # repository index: "flat" (exact), "ivf" or "auto" (IVF from 262,144 edits on)
    seed: int = 0  # initialisation of random networks (checkpoint: null)


@dataclass(frozen=True)
class Retrieval:
    """What the provider decided for one query (``RecipeEditor.last_retrieval``)."""

    prompt: str
    edit_id: EditId | None  # the entry whose prompt was used; None: a gate (sentinel, verifier, subject) turned it down
    score: float  # s(q, k) of the top-1 entry (-inf when the repository is empty)
    threshold: float  # s(q, r_s)
    verified: float = math.nan  # the verifier's p(top-1 entry bears on the query); nan: not asked
    subject_in_query: bool | None = None  # the top-1 edit's subject occurs in the query; None: not checked


def edit_prefix(vectors: Tensor, token_ids: Sequence[int] | None) -> Prefix:
    """What an edit puts before a query: its prompt ``vectors`` (l, H), then its statement's tokens if given
    ("vectors+statement"). The LM embeds them (:meth:`EditedLM.prefix_embeddings`)."""
    return Prefix(vectors, tuple(token_ids) if token_ids is not None else ())


@register_editor
class RecipeEditor(SavedEdits, Editor):
    """RECIPE behind the Editor protocol; ``save(dir)``/``load(dir)`` persist the repository."""

    name = "recipe"
    config_cls = RecipeConfig

    def __init__(self, lm: EditedLM, config: RecipeConfig | None = None):
        super().__init__(lm, config)
        if self.config.checkpoint == SHIPPED:  # recorded as the folder it resolved to
            self.config = replace(self.config, checkpoint=shipped_checkpoint(RECIPE, lm))
        cfg = self.config
        separator = DEFAULT_SEPARATOR
        if cfg.checkpoint is None:
            self.networks = RecipeNetworks.build(lm, cfg.architecture, sentinel_mode=cfg.sentinel_mode,
                                                 threshold=cfg.threshold, seed=cfg.seed)
        else:
            self.networks, meta = load_recipe_artifact(cfg.checkpoint, lm, sentinel_mode=cfg.sentinel_mode,
                                                       threshold=cfg.threshold)
            if meta.get("prefix_mode") != cfg.prefix_mode:
                raise IncompatibleError(f"checkpoint {cfg.checkpoint} was trained with prefix_mode "
                                        f"{meta.get('prefix_mode')!r}; the config asks for {cfg.prefix_mode!r}")
            separator = meta.get("statement_separator", "")
        self.separator = separator if cfg.statement_separator is None else cfg.statement_separator
        self.networks.eval().requires_grad_(False)
        arch = self.networks.arch
        if cfg.max_statement_tokens < 1:
            raise RecipeError(f"max_statement_tokens must be >= 1, got {cfg.max_statement_tokens}")
        self.statement_bound = statement_token_bound(lm, arch.n_vectors, cfg.max_statement_tokens)
        self.gates = self._gates()
        self.info = {"lm": lm.spec.name, "hidden_size": lm.hidden_size, "key_dim": arch.key_dim,
                     "n_vectors": arch.n_vectors, "prefix_mode": cfg.prefix_mode,
                     "statement_separator": self.separator,
                     "encoder": f"{arch.encoder}:{self.networks.fingerprint()[:16]}"}
        self.repository = self._new_repository()
        self._records: dict[EditId, EditRecord] = {}  # id -> the stored edit, insertion order
        self._by_statement: dict[str, EditId] = {}  # statement of an entry in use -> id (duplicates)
        self._by_question: dict[str, EditId] = {}  # question key -> the id of the entry in use (updates)
        self._shelf = Shelf()  # keys and prompts of superseded entries
        self.last_retrieval: list[Retrieval] = []
        self.last_superseded: dict[EditId, EditId] = {}  # the latest edit() call: new id -> the id it superseded

    def _gates(self) -> list[Gate]:
        """The configured acceptance gates, in order: sentinel, verifier, subject."""
        cfg = self.config
        if cfg.subject_gate_bypass is not None and (cfg.verifier is None or not cfg.subject_gate):
            raise RecipeError("subject_gate_bypass needs subject_gate: true and a verifier")
        gates: list[Gate] = [SentinelGate(self.networks.sentinel, cfg.sentinel_margin)]
        if cfg.verifier is not None:
            verifier, meta = load_verifier(cfg.verifier, self.lm.device)
            threshold = float(meta["threshold"] if cfg.verifier_threshold is None else cfg.verifier_threshold)
            gates.append(VerifierGate(verifier, threshold))
        if cfg.subject_gate:
            gates.append(SubjectGate(cfg.subject_gate_bypass))
        return gates

    def _new_repository(self) -> KnowledgeRepository:
        arch = self.networks.arch
        return KnowledgeRepository(arch.key_dim, (arch.n_vectors, self.lm.hidden_size), info=self.info,
                                   use_gpu=self.config.use_gpu, prompt_dtype=self.config.prompt_dtype,
                                   index=self.config.index)

    def _records_of(self, ids: Sequence[EditId], statements: Sequence[str], subjects: Sequence[str | None],
                    where: str = "", **updates: Sequence | None) -> list[EditRecord]:
        """Checked records (StatementError on an empty or too long statement); ``updates``: their
        ``questions`` and ``superseded_by``."""
        return make_records(self.lm, ids, statements, subjects, separator=self.separator, where=where,
                            with_tokens=self.config.prefix_mode == "vectors+statement", bound=self.statement_bound,
                            **updates)

    # ---- editing -----------------------------------------------------------------------------
    def _apply(self, requests: Sequence[EditRequest], ids: list[EditId]) -> None:
        records = self._records_of(ids, [normalise_statement(r.statement) for r in requests],
                                   [r.subject for r in requests], questions=[question_key(r.prompt) for r in requests])
        statements = [r.statement for r in records]
        for s in statements:
            if s in self._by_statement and self.config.duplicates == "error":
                raise RecipeError(f"duplicate statement {s!r}: already stored as edit {self._by_statement[s]}; "
                                  "remove() it first (or set duplicates: replace)")
        if len(set(statements)) != len(statements):
            raise RecipeError("the same statement occurs twice in one edit() call")
        replaced = [self._by_statement[s] for s in statements if s in self._by_statement]
        retrieved = self._retrieved_restatements(requests)
        keys, vectors = self._encode_statements(statements)  # (N, D), (N, l, H)
        if self.config.refine_steps > 0:
            b = self.lm.max_batch
            vectors = torch.cat([self._refine(requests[s:s + b], vectors[s:s + b], records[s:s + b])
                                 for s in range(0, len(requests), b)])
        self.repository.add(keys, vectors, ids=ids)
        if replaced:
            self.remove(replaced)
        self.last_superseded = {}
        for record, near in zip(records, retrieved):
            older = self._by_question.get(record.question) if record.question else None
            if older is None and near in self._records and self._records[near].superseded_by is None:
                older = near  # not replaced, not superseded earlier in this call
            older = older if self.config.supersede else None
            self._remember(record)
            if older is not None:
                self._shelve(older, record.id)
                self.last_superseded[record.id] = older
        self.lm.prefix_provider = self._provide

    @torch.no_grad()
    def _retrieved_restatements(self, requests: Sequence[EditRequest]) -> list[EditId | None]:
        """For each request, the entry in use its question restates by retrieval (``supersede_margin``,
        ``recipe.retrieval.updates``): its top-1, with s(q, k) > s(q, r_s) + margin and the same subject."""
        margin, out = self.config.supersede_margin, []
        if not self.config.supersede or margin is None or len(self.repository) == 0:
            return [None] * len(requests)
        for s in range(0, len(requests), self.config.batch_size):
            chunk = requests[s:s + self.config.batch_size]
            r_q = self.networks.encoder.encode_query([r.prompt for r in chunk]).float()  # (b, D)
            scores, ids = self.repository.search(r_q / math.sqrt(self.networks.arch.key_dim), k=1)
            over = torch.from_numpy(scores[:, 0]).to(r_q.device) > self.networks.sentinel(r_q) + margin  # (b,)
            for request, i, ok in zip(chunk, ids[:, 0].tolist(), over.tolist()):
                subject = self._records[i].subject if ok and i in self._records else None
                same = subject is not None and request.subject is not None
                out.append(i if same and subject.casefold() == request.subject.casefold() else None)
        return out

    def _remember(self, record: EditRecord) -> None:
        self._records[record.id] = record
        if record.superseded_by is None:
            self._by_statement[record.statement] = record.id
            if record.question:
                self._by_question[record.question] = record.id

    def _forget(self, edit_id: EditId) -> EditRecord:
        """Drop ``edit_id`` from the lookups of entries in use (its record stays); returns the record."""
        record = self._records[edit_id]
        if self._by_statement.get(record.statement) == edit_id:
            del self._by_statement[record.statement]
        if self._by_question.get(record.question) == edit_id:
            del self._by_question[record.question]
        return record

    def _shelve(self, edit_id: EditId, newer: EditId) -> None:
        """Take ``edit_id`` out of the index, superseded by ``newer`` (which is in use)."""
        self._shelf.put(edit_id, self.repository.keys([edit_id])[0], self.repository.get_prompts([edit_id])[0])
        self.repository.remove([edit_id])
        self._records[edit_id] = replace(self._forget(edit_id), superseded_by=newer)

    def _restore(self, edit_id: EditId) -> None:
        """Put a superseded entry back into the index."""
        key, prompt = self._shelf.take(edit_id)
        self.repository.add(key[None], prompt[None], ids=[edit_id])
        self._remember(replace(self._records[edit_id], superseded_by=None))

    @torch.no_grad()
    def _encode_statements(self, statements: list[str]) -> tuple[Tensor, Tensor]:
        keys, vectors = [], []
        for s in range(0, len(statements), self.config.batch_size):
            r_k = self.networks.encoder.encode_knowledge(statements[s:s + self.config.batch_size])  # (b, D)
            keys.append(r_k.float().cpu())
            vectors.append(self.networks.prompt_encoder(r_k).float().cpu())  # (b, l, H)
        return torch.cat(keys), torch.cat(vectors)

    def _refine(self, requests: Sequence[EditRequest], vectors: Tensor, records: Sequence[EditRecord]) -> Tensor:
        """A few Adam steps on each edit's own prompt vectors: NLL of target_new after prompt (LM frozen)."""
        cfg = self.config
        prompts, targets = [r.prompt for r in requests], [r.target_new for r in requests]
        vectors = vectors.to(self.lm.device).clone().requires_grad_(True)  # (N, l, H)
        opt = torch.optim.Adam([vectors], lr=cfg.refine_lr * float(self.networks.prompt_encoder.emb_scale))
        with torch.enable_grad():
            for _ in range(cfg.refine_steps):
                prefixes = [edit_prefix(v, r.token_ids) for v, r in zip(vectors, records)]
                logp, _, _, mask = self.lm.target_logprobs(prompts, targets, prefixes)
                loss = -(logp * mask).sum() / mask.sum()
                if loss.item() < cfg.refine_stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return vectors.detach().float().cpu()

    def remove(self, ids: Sequence[EditId]) -> None:
        """Remove edits (in use or superseded); an entry that a removed edit superseded is in use again
        unless a newer, kept edit superseded it too (then it is superseded by that one)."""
        removed = set(ids)
        unknown = sorted(i for i in removed if i not in self._records)
        if unknown:
            raise RecipeError(f"unknown edit id(s) {unknown[:10]}; nothing removed")
        relinked, restore = after_removal(self.superseded(), removed)
        self.repository.remove([i for i in removed if i not in self._shelf])
        for i in removed:
            self._forget(i)
            del self._records[i]
        self._shelf.discard(removed)
        for old, newer in relinked.items():
            self._records[old] = replace(self._records[old], superseded_by=newer)
        for old in sorted(restore):
            self._restore(old)

    def rollback(self) -> None:
        if self.lm.prefix_provider == self._provide:
            self.lm.prefix_provider = None
        self.repository = self._new_repository()
        self._records.clear()
        self._by_statement.clear()
        self._by_question.clear()
        self._shelf.clear()
        self.last_retrieval = []
        self.last_superseded = {}
        self._next_id = 0

    @property
    def statements(self) -> dict[EditId, str]:
        """Every stored edit: id -> knowledge statement (a copy)."""
        return {i: r.statement for i, r in self._records.items()}

    @property
    def records(self) -> dict[EditId, EditRecord]:
        """Every stored edit, superseded ones included: id -> its record (a copy of the mapping; records
        are frozen)."""
        return dict(self._records)

    def superseded(self) -> dict[EditId, EditId]:
        """Every superseded edit -> the edit that superseded it (the next one of its chain)."""
        return {i: self._records[i].superseded_by for i in self._shelf.ids()}

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def _provide(self, prompts: Sequence[str]) -> list[Prefix | None]:
        """The prefix provider: question texts -> the accepted entry's prefix, or None (base model)."""
        self.last_retrieval = []
        if len(self.repository) == 0:
            self.last_retrieval = [Retrieval(p, None, -math.inf, math.nan) for p in prompts]
            return [None] * len(prompts)
        out: list[Prefix | None] = []
        scale = math.sqrt(self.networks.arch.key_dim)
        for s in range(0, len(prompts), self.config.batch_size):
            chunk = list(prompts[s:s + self.config.batch_size])
            r_q = self.networks.encoder.encode_query(chunk).float()  # (b, D)
            scores, ids = self.repository.search(r_q / scale, k=1)  # (b, 1) each: s(q, k_top)
            top = torch.from_numpy(scores[:, 0]).to(r_q.device)  # (b,)
            records = [self._records[i] for i in ids[:, 0].tolist()]
            accept, diagnostics = apply_gates(self.gates, Candidates(chunk, r_q, top, records))
            n = len(chunk)
            for p, ok, record, sc, th, v, named in zip(chunk, accept, records, top.tolist(), diagnostics["threshold"],
                                                       diagnostics.get("verified", [math.nan] * n),
                                                       diagnostics.get("subject_in_query", [None] * n)):
                self.last_retrieval.append(Retrieval(p, record.id if ok else None, sc, th, v, named))
                out.append(self._prefix(record) if ok else None)
        return out

    def _prefix(self, record: EditRecord) -> Prefix:
        vectors = self.repository.get_prompts([record.id])[0].to(self.lm.device)  # (l, H)
        return edit_prefix(vectors, record.token_ids)
