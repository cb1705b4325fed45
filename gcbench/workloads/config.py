"""What a workload and its encoders are, as typed configs; each field carries its help and range.

The registries of workload builders and text-tower kinds live here too, so that a config can name only
what exists (extras such as :mod:`gcbench.peers` add kinds at import time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import AfterValidator
from torch import Tensor, nn

from gcbench.typed import Bool, Float, Int, key, typed

if TYPE_CHECKING:
    from gcbench.workloads.tasks import Workload

FEATURE_KIND = "mlp"  # an encoder of feature vectors (the image tower, SimCLR views)


@dataclass(frozen=True)
class TextTower:
    """How a kind of text encoder is built and fed: random token ids, or a real tokenizer."""

    build: Callable[[ModelConfig, int], nn.Module]
    tokens: Callable[[ModelConfig, int, int, torch.Generator], dict[str, Tensor]]

    def check(self, workload: WorkloadConfig) -> None:
        """Raise UsageError, before any work, if ``workload`` cannot use this tower (built-in towers: never)."""


TEXT_TOWERS: dict[str, TextTower] = {}  # kind -> tower; ``transformer`` here, more from extras
WORKLOADS: dict[str, Callable[[WorkloadConfig], Workload]] = {}  # name -> builder


def _known(registry: Callable[[], list[str]]) -> Callable[[str], str]:
    def check(value: str) -> str:
        options = registry()
        if value not in options:
            raise ValueError(f"unknown value {value!r}; choose from {', '.join(options)}")
        return value

    return check


def model_kinds() -> list[str]:
    return [*TEXT_TOWERS, FEATURE_KIND]


ModelKind = Annotated[str, AfterValidator(_known(model_kinds))]
WorkloadName = Annotated[str, AfterValidator(_known(lambda: list(WORKLOADS)))]


@typed
class ModelConfig:
    """Sizes of an encoder (``[model]`` in an experiment)."""

    kind: ModelKind = key(
        "transformer: gcbench's BERT-style encoder; mlp: feature vectors; more from extras", default="transformer"
    )
    hidden: Int = key("width of the representation and of every layer", default=128, ge=1)
    layers: Int = key("transformer blocks (mlp: hidden layers)", default=2, ge=1)
    heads: Int = key("attention heads; must divide hidden", default=4, ge=1)
    ffn: Int = key("feed-forward width (0: 4 x hidden)", default=0, ge=0)
    vocab: Int = key("vocabulary size of the random token ids", default=30522, ge=2000)
    dropout: Float = key("dropout probability (hidden states and attention)", default=0.1, ge=0.0, lt=1.0)
    pooling: Literal["cls", "mean"] = key(
        "how a sequence becomes one vector: first token or masked mean", default="cls"
    )
    features: Int = key("input width of mlp towers (image features, SimCLR views)", default=256, ge=1)
    attention: Literal["sdpa", "eager"] = key(
        "sdpa: fused kernels; eager: softmax(QK^T)V spelt out, its probabilities stored, as 2021's BERT did",
        default="sdpa",
    )

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be a multiple of model.heads ({self.heads})")

    @property
    def ffn_size(self) -> int:
        return self.ffn or 4 * self.hidden


@typed
class WorkloadConfig:
    """What is trained on what data (``[workload]`` in an experiment; ``[model]`` is its ``model``)."""

    name: WorkloadName = key(
        "dpr (queries and passages), clip (texts and image features), simclr (two views)",
        flag="--workload",
        default="dpr",
    )
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    query_length: Int = key("tokens per query (dpr), caption (clip) or view (simclr on text)", default=32, ge=1)
    passage_length: Int = key("tokens per passage (dpr)", default=128, ge=1)
    hard_negatives: Int = key("hard-negative passages per query (dpr)", default=1, ge=0)
    tied: Bool = key("dpr: one encoder for queries and passages", default=False)
    temperature: Float | None = key("softmax temperature (none: the workload's usual value)", default=None, gt=0.0)
    loss_tile: Int = key(
        "compute the loss in tiles of this many rows and columns of the score matrix, never holding it whole: "
        "memory O(batch x width + tile^2) instead of O(batch^2), same gradients (0: the whole matrix)",
        flag="--loss-tile",
        default=0,
        ge=0,
    )

    @property
    def loss_tile_size(self) -> int | None:
        """``tile_size`` for the loss modules: None for the whole score matrix."""
        return self.loss_tile or None
