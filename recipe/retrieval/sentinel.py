"""KnowledgeSentinel: decides "retrieve nothing" (RECIPE sec. 3.3, the Knowledge Sentinel).

The sentinel is a learned knowledge representation r_s in the retrieval space, so each query q gets
its own threshold ``s(q, r_s) = r_q . r_s / sqrt(D) + b``: the top-1 entry's prompt is used only when
``s(q, k) > s(q, r_s)``. The scalar ``b`` (not in the paper; starts at 0) lets the threshold move as a
whole without bending r_s; it makes the fixed threshold a special case (r_s = 0).

``mode="fixed"`` is the ablation: one constant ``threshold`` for every query (r_s and b unused).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

SentinelMode = Literal["learned", "fixed"]


class KnowledgeSentinel(nn.Module):
    """Per-query rejection threshold: learned (r_s, b) or fixed."""

    def __init__(self, key_dim: int, mode: SentinelMode = "learned", threshold: float = 0.0, init_std: float = 0.02):
        super().__init__()
        if mode not in ("learned", "fixed"):
            raise ValueError(f"sentinel mode must be 'learned' or 'fixed', got {mode!r}")
        self.key_dim, self.mode, self.threshold = key_dim, mode, float(threshold)
        self.r_s = nn.Parameter(init_std * torch.randn(key_dim))  # (D,) the sentinel knowledge representation
        self.bias = nn.Parameter(torch.zeros(()))  # b

    def forward(self, r_q: Tensor) -> Tensor:
        """s(q, r_s) for each query: (B, D) -> (B,)."""
        if self.mode == "fixed":
            return torch.full(r_q.shape[:1], self.threshold, device=r_q.device)
        with torch.autocast(r_q.device.type, enabled=False):  # float32 even under bf16 autocast
            return r_q.float() @ self.r_s.float() / math.sqrt(self.key_dim) + self.bias.float()  # (B,)

    def accept(self, top_scores: Tensor, r_q: Tensor, margin: float = 0.0) -> Tensor:
        """Which queries use their top-1 entry: ``s(q, k_top) > s(q, r_s) + margin``, (B,) bool.

        ``margin`` shifts every query's threshold (negative: accept more). An empty repository scores
        -inf and is never accepted.
        """
        return top_scores.float() > self(r_q) + margin
