"""The built-in contrastive losses over in-batch negatives (public: ``from gcbench.losses import ...``).

Each is a module, so a learnable temperature (and SigLIP's bias) trains with the encoders. They derive
their targets from shapes alone, so they work unchanged on a micro-batch (the
``accumulate`` strategy) and on representations gathered from several processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InBatchSoftmax(nn.Module):
    """DPR: each query against every passage of the batch; its positive is first of its group.

    Passages come in groups of ``passages // queries`` per query (positive, then hard negatives).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, queries: Tensor, passages: Tensor) -> Tensor:
        if passages.shape[0] % queries.shape[0]:
            raise ValueError(
                f"InBatchSoftmax: {passages.shape[0]} passages do not split into groups for {queries.shape[0]} queries"
            )
        group = passages.shape[0] // queries.shape[0]
        scores = queries @ passages.T / self.temperature
        targets = torch.arange(queries.shape[0], device=queries.device) * group
        return F.cross_entropy(scores, targets)


class SymmetricInfoNCE(nn.Module):
    """CLIP: cosine similarities scaled by a learnable temperature, cross-entropy both ways."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self, texts: Tensor, images: Tensor) -> Tensor:
        texts, images = F.normalize(texts, dim=-1), F.normalize(images, dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * texts @ images.T
        targets = torch.arange(texts.shape[0], device=texts.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class NTXent(nn.Module):
    """SimCLR: 2N views, each one's positive is the other view of its example, the rest negatives."""

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        n = first.shape[0]
        views = F.normalize(torch.cat([first, second]), dim=-1)
        scores = views @ views.T / self.temperature
        scores = scores.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=scores.device), float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(scores.device)
        return F.cross_entropy(scores, targets)


class SigmoidLoss(nn.Module):
    """SigLIP: every text-image pair is its own binary decision (matching or not), no softmax over the batch.

    ``-sum_ij log sigmoid(z_ij * (t * <x_i, y_j> + b)) / N`` with ``z_ij`` 1 on the diagonal and -1 off it,
    a learnable temperature ``t = exp(logit_scale)`` (10 at the start) and a learnable bias (-10), as in
    Zhai et al. (2023).
    """

    def __init__(self, temperature: float = 0.1, bias: float = -10.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, texts: Tensor, images: Tensor) -> Tensor:
        if texts.shape[0] != images.shape[0]:
            raise ValueError(f"SigmoidLoss: {texts.shape[0]} texts against {images.shape[0]} images; pairs needed")
        texts, images = F.normalize(texts, dim=-1), F.normalize(images, dim=-1)
        logits = self.logit_scale.exp() * texts @ images.T + self.logit_bias
        signs = 2 * torch.eye(texts.shape[0], dtype=logits.dtype, device=logits.device) - 1
        return -F.logsigmoid(signs * logits).sum() / texts.shape[0]
