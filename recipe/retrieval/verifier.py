"""EditVerifier: a cross-encoder that checks the sentinel's decision (not in the RECIPE paper).

The retriever scores a query and a statement from two separate sentence vectors, so a query about
*another relation of the same subject* ("Where was Joe Biden born?" against "The spouse of Joe Biden
is Jill Biden") scores close to the edit's own questions: on the RippleEdits recent test the learned
sentinel accepted 47% of such Relation_Specificity probes, and no constant margin on its threshold
rejects them without losing paraphrases (``benchmarks/retrieval_check.py``, margins). A pooled
pair classifier on frozen sentence vectors did not separate them either
(``benchmarks/results/retrieval/verifier_probe.txt``).

The verifier reads both texts in one sequence, ``[CLS] query [SEP] statement [SEP]``, so every layer
compares the query's relation words with the statement's: the same sentence-encoder body (MiniLM), its
top ``train_body_layers`` layers trained, mean pooling over real tokens, an MLP to one logit =
log-odds that the statement answers or bears on the query. It runs once per *accepted* query, on the
top-1 entry only: ``RecipeEditor`` uses that entry's prompt only when ``sigmoid(logit) > threshold``.
A rejection gives the unedited model, exactly as a sentinel rejection does.

Artefact (``recipe.artifacts.save_verifier`` / ``load_verifier``): ``verifier.safetensors`` (the head
and trained body layers in fp16; the frozen layers come from the body's own package) +
``verifier.json`` (architecture, seed, threshold, training record), checksummed by its manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from recipe.errors import RecipeError
from recipe.retrieval.encoders import EncoderName, load_body, mean_pool, train_top_layers


@dataclass
class VerifierArchitecture:
    encoder: EncoderName = "all-MiniLM-L6-v2"  # sentence-encoder body; "tiny-bert" is random, for tests
    train_body_layers: int = 3  # top layers of the body that train (of MiniLM's 6)
    head_hidden: int = 256  # width of the MLP head
    max_tokens: int = 96  # query + statement, truncated to this many tokens


class EditVerifier(nn.Module):
    """(queries, statements) -> logits (B,): does the statement bear on the query?"""

    def __init__(self, arch: VerifierArchitecture, seed: int = 0):
        super().__init__()
        self.arch, self.seed = arch, seed  # the seed builds "tiny-bert"'s frozen random layers: saved with it
        self.body, self.tokenizer = load_body(arch.encoder, seed)
        d = self.body.config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, arch.head_hidden), nn.GELU(),
                                      nn.Linear(arch.head_hidden, 1))
        self.trained_prefixes = train_top_layers(self.body, arch.train_body_layers)

    @property
    def device(self) -> torch.device:
        return self.head[1].weight.device

    def forward(self, queries: Sequence[str], statements: Sequence[str]) -> Tensor:
        if len(queries) != len(statements):
            raise RecipeError(f"{len(queries)} queries for {len(statements)} statements")
        batch = self.tokenizer(list(queries), list(statements), padding=True, truncation="longest_first",
                               max_length=self.arch.max_tokens, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)  # (B, T)
        extra = {"token_type_ids": batch["token_type_ids"].to(self.device)} if "token_type_ids" in batch else {}
        hidden = self.body(input_ids=ids, attention_mask=mask, **extra).last_hidden_state.float()  # (B, T, d)
        return self.head(mean_pool(hidden, mask))[:, 0]  # (B,)

    @torch.no_grad()
    def probability(self, queries: Sequence[str], statements: Sequence[str], batch_size: int = 64) -> Tensor:
        """sigmoid(logit) for every pair, in batches: (B,) float32 on the CPU."""
        out = [torch.sigmoid(self(queries[s:s + batch_size], statements[s:s + batch_size]).float()).cpu()
               for s in range(0, len(queries), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def artifact_state(self) -> dict[str, Tensor]:
        """The tensors training changes: the head and the trained body layers."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("body.") or k.startswith(self.trained_prefixes)}
