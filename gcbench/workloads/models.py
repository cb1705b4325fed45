"""Encoders built from torch.nn with random weights: weights change neither memory nor speed.

``transformer`` is a BERT-style text encoder (token + position embeddings, dropout, post-LN blocks
with masked attention, CLS, mean or last-token pooling) that reaches BERT-base at ``hidden=768, layers=12``.
``mlp`` encodes feature vectors (an "image" tower, SimCLR views). Both support per-layer activation
checkpointing through their ``gradient_checkpointing`` attribute.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gcbench.workloads.config import ModelConfig


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, p: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)


def _eager(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, p: float) -> Tensor:
    """Scores, softmax and dropout as separate ops: the (batch, heads, L, L) probabilities are stored."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~key_mask, float("-inf")).softmax(-1)
    return F.dropout(probs, p, training=p > 0) @ v


ATTENTION = {"sdpa": _sdpa, "eager": _eager}


class _Block(nn.Module):
    """Post-LN transformer block (BERT): attention, add & norm, feed-forward, add & norm."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, attention: str = "sdpa") -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"model.hidden ({hidden}) must be a multiple of model.heads ({heads})")
        if attention not in ATTENTION:
            raise ValueError(f"model.attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.heads = heads
        self.dropout = dropout
        self.attend = ATTENTION[attention]
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.ff_in = nn.Linear(hidden, ffn)
        self.ff_out = nn.Linear(ffn, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        n, length, hidden = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        attended = self.attend(q, k, v, key_mask, p)
        attended = attended.transpose(1, 2).reshape(n, length, hidden)
        x = self.norm1(x + F.dropout(self.out(attended), p, self.training))
        return self.norm2(x + F.dropout(self.ff_out(F.gelu(self.ff_in(x))), p, self.training))


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """One vector per row of ``hidden`` (batch, length, width): its first token, the mean of its unmasked ones, or
    its last unmasked one (a decoder embedder's, padding on either side)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.to(torch.long) * (positions + 1)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":  # sentence-transformers' mean pooling, to the same clamp
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    raise ValueError(f"model.pooling must be 'cls', 'mean' or 'last', got {pooling!r}")


class TransformerEncoder(nn.Module):
    """``forward(input_ids, attention_mask)`` -> pooled representation ``(batch, hidden)``, L2-normalised if asked."""

    def __init__(self, config: ModelConfig, max_length: int) -> None:
        super().__init__()
        if config.pooling not in ("cls", "mean", "last"):
            raise ValueError(f"model.pooling must be 'cls', 'mean' or 'last', got {config.pooling!r}")
        self.pooling = config.pooling
        self.normalize = config.normalize
        self.tokens = nn.Embedding(config.vocab, config.hidden)
        self.positions = nn.Embedding(max_length, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            _Block(config.hidden, config.heads, config.ffn_size, config.dropout, config.attention)
            for _ in range(config.layers)
        )
        self.gradient_checkpointing = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = torch.arange(length, device=input_ids.device)
        x = self.dropout(self.norm(self.tokens(input_ids) + self.positions(positions)))
        key_mask = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, key_mask, use_reentrant=False)
            else:
                x = block(x, key_mask)
        rep = pool(x, attention_mask, self.pooling)
        return F.normalize(rep, dim=-1) if self.normalize else rep


class MLPEncoder(nn.Module):
    """Feature vectors ``(batch, features)`` -> ``(batch, out)`` through ``layers`` GELU blocks."""

    def __init__(self, config: ModelConfig, out_features: int | None = None) -> None:
        super().__init__()
        widths = [config.features] + [config.hidden] * config.layers
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.GELU(), nn.Dropout(config.dropout)) for a, b in itertools.pairwise(widths)
        )
        self.head = nn.Linear(widths[-1], out_features or config.hidden)
        self.gradient_checkpointing = False

    def forward(self, features: Tensor) -> Tensor:
        x = features
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)
