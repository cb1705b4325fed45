"""Your own model and data, measured by gcbench without a change to it: ``[workload] factory = "my_encoders:pairs"``.

The encoder is written the way sentence-transformers writes its models: ``forward`` takes one features
mapping and returns a mapping with a ``sentence_embedding``. So each batch is ``(features,)`` (a tuple:
the encoder is called with one positional argument) and ``get_rep`` pulls the embedding out. gcbench
slices every tensor inside, however deep, chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcbench import UserWorkload

VOCAB, WIDTH = 5000, 64


class BagOfWords(nn.Module):
    """Word embeddings, dropout, a masked mean and a projection: small, but with dropout to replay."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH, dropout: float = 0.1) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, width)
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        mask = features["attention_mask"].unsqueeze(-1).float()
        words = self.dropout(self.words(features["input_ids"]))
        mean = (words * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return {**features, "sentence_embedding": F.normalize(self.project(mean), dim=-1)}


def sentences(rows: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (rows, 1), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def pairs(seed: int) -> UserWorkload:
    """Queries and passages through one tied encoder; gcbench's default loss (in-batch InfoNCE)."""
    encoder = BagOfWords()

    def make_batches(batch_size: int, generator: torch.Generator) -> list[tuple[dict[str, Tensor]]]:
        return [(sentences(batch_size, 12, generator),), (sentences(batch_size, 48, generator),)]

    return UserWorkload([encoder, encoder], make_batches, get_rep=lambda output: output["sentence_embedding"])
