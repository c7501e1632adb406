"""RecipeNetworks: RECIPE's trained parts in one module (knowledge encoder, prompt encoder, sentinel).

``build`` makes fresh networks for an LM; training (``train.recipe``) changes them; an artefact holds
``artifact_state()``. The networks do no I/O themselves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from recipe.retrieval.encoders import KnowledgeEncoder, PromptEncoder, RecipeArchitecture, load_body, prompt_init_embeddings
from recipe.retrieval.sentinel import KnowledgeSentinel, SentinelMode

if TYPE_CHECKING:
    from recipe.lm import EditedLM


class RecipeNetworks(nn.Module):
    """The trainable parts: knowledge encoder (body + two heads), prompt encoder, sentinel."""

    def __init__(self, encoder: KnowledgeEncoder, prompt_encoder: PromptEncoder, sentinel: KnowledgeSentinel,
                 arch: RecipeArchitecture):
        super().__init__()
        self.encoder, self.prompt_encoder, self.sentinel, self.arch = encoder, prompt_encoder, sentinel, arch

    @classmethod
    def build(cls, lm: EditedLM, arch: RecipeArchitecture, *, sentinel_mode: SentinelMode = "learned",
              threshold: float = 0.0, seed: int = 0) -> RecipeNetworks:
        """Fresh networks for ``lm`` (random heads, the body's own weights), on the LM's device."""
        body, tokenizer = load_body(arch.encoder, seed)
        emb = lm.model.get_input_embeddings()
        init_ids = lm.tokenizer(arch.prompt_init_text, add_special_tokens=False).input_ids
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = KnowledgeEncoder(body, tokenizer, arch)
            init = prompt_init_embeddings(emb, init_ids, arch.n_vectors)  # (l, H)
            prompt_encoder = PromptEncoder(arch.key_dim, arch.n_vectors, lm.hidden_size, init,
                                           emb.weight.detach().float().std().item(), arch)
            sentinel = KnowledgeSentinel(arch.key_dim, sentinel_mode, threshold)
        return cls(encoder, prompt_encoder, sentinel, arch).to(lm.device)

    def artifact_state(self) -> dict[str, Tensor]:
        """Every tensor that training changes: heads, trained body layers, prompt encoder, sentinel."""
        trained = tuple(f"encoder.{p}" for p in self.encoder.trained_body_prefixes)
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith("encoder.body.") or k.startswith(trained)}

    def fingerprint(self) -> str:
        """sha256 over the architecture and the tensors that make keys and prompts (not the sentinel)."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.arch), sort_keys=True).encode())
        for name, value in sorted(self.artifact_state().items()):
            if not name.startswith("sentinel."):
                digest.update(name.encode())
                digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
