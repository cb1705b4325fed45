"""What a workload and its encoders are, as typed configs; each field carries its help and range.

The registries of workload builders and of text- and image-tower kinds live here too, so that a config can
name only what exists (extras such as :mod:`gcbench.peers` add kinds at import time). A workload is a
built-in one by name, or a user's own by import path (``package.module:function``, see
:mod:`gcbench.workloads.user`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import AfterValidator
from torch import Tensor, nn

from gcbench.errors import UsageError
from gcbench.imports import is_import_path
from gcbench.typed import Bool, Float, Int, Str, key, typed
from gcbench.workloads.lengths import LengthDistribution, parse_lengths

if TYPE_CHECKING:
    from gcbench.workloads.tasks import Inputs, Workload

FEATURE_KIND = "mlp"  # an encoder of feature vectors (the image tower, SimCLR views)
IMAGE_TEXT = ("clip", "siglip")  # the workloads with an image tower
POOLINGS = ("cls", "mean", "last")  # what every text tower can do; hf kinds add "pooler"


@dataclass(frozen=True)
class TextTower:
    """How a kind of text encoder is built and fed: random token ids, or a real tokenizer."""

    build: Callable[[ModelConfig, int], nn.Module]
    tokens: Callable[[ModelConfig, int, int, torch.Generator], dict[str, Tensor]]
    poolings: tuple[str, ...] = POOLINGS

    def check(self, workload: WorkloadConfig) -> None:
        """Raise UsageError, before any work, if ``workload`` cannot use this tower."""
        if workload.model.pooling not in self.poolings:
            raise UsageError(
                f"model.pooling: model.kind {workload.model.kind!r} pools by {', '.join(self.poolings)}, "
                f"not {workload.model.pooling!r}"
            )
        if workload.model.lora is not None and not self.accepts_lora():
            raise UsageError(f"model.lora: LoRA applies to model.kind 'hf', not {workload.model.kind!r}")

    def accepts_lora(self) -> bool:
        return False


@dataclass(frozen=True)
class ImageTower:
    """How a kind of image encoder is built (its output ``width`` wide) and fed."""

    build: Callable[[WorkloadConfig, int], nn.Module]
    inputs: Callable[[WorkloadConfig, int, torch.Generator], Inputs]

    def check(self, workload: WorkloadConfig) -> None:
        """Raise UsageError, before any work, if ``workload`` cannot use this tower (built-in: never)."""


TEXT_TOWERS: dict[str, TextTower] = {}  # kind -> tower; ``transformer`` here, more from extras
IMAGE_TOWERS: dict[str, ImageTower] = {}  # kind -> tower; ``mlp`` here, ``hf`` from the real extra
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


def _workload_name(value: str) -> str:
    """A built-in workload's name, or an import path to a user's factory (imported when the experiment is checked)."""
    return value if is_import_path(value) else _known(lambda: list(WORKLOADS))(value)


ModelKind = Annotated[str, AfterValidator(_known(model_kinds))]
ImageKind = Annotated[str, AfterValidator(_known(lambda: list(IMAGE_TOWERS)))]
WorkloadName = Annotated[str, AfterValidator(_workload_name)]
HFConfig = dict[str, Any]  # an inline Hugging Face config: a TOML table, model_type and sizes


@typed
class LoraConfig:
    """LoRA adapters on an ``hf`` model (``[model.lora]``, extra ``lora``: peft): the base frozen, only the
    adapters train."""

    r: Int = key("rank of each adapter", default=8, ge=1)
    alpha: Float = key("scale numerator: an adapter's output is multiplied by alpha / r", default=16.0, gt=0.0)
    dropout: Float = key("dropout on each adapter's input", default=0.0, ge=0.0, lt=1.0)
    target_modules: tuple[Str, ...] = key(
        "names of the modules to adapt, matched as peft matches them (a module's name or its last parts), "
        'e.g. ["query", "value"] for BERT, ["q_proj", "v_proj"] for Qwen3 and Llama',
        default=("query", "value"),
        min_length=1,
    )


@typed
class ModelConfig:
    """Sizes of an encoder (``[model]`` in an experiment; clip's and siglip's text tower)."""

    kind: ModelKind = key(
        "transformer: gcbench's BERT-style encoder; mlp: feature vectors; with the real extra, hf: any Hugging "
        "Face encoder, sentence-transformers: a local model folder, and more",
        default="transformer",
    )
    hidden: Int = key("width of the representation and of every layer", default=128, ge=1)
    layers: Int = key("transformer blocks (mlp: hidden layers)", default=2, ge=1)
    heads: Int = key("attention heads; must divide hidden", default=4, ge=1)
    ffn: Int = key("feed-forward width (0: 4 x hidden)", default=0, ge=0)
    vocab: Int = key("vocabulary size of the random token ids", default=30522, ge=2000)
    dropout: Float = key(
        "dropout probability (hidden states and attention; hf: every dropout of its config)",
        default=0.1,
        ge=0.0,
        lt=1.0,
    )
    pooling: Literal["cls", "mean", "last", "pooler"] = key(
        "how a sequence becomes one vector: first token, masked mean, last non-padding token (decoders), or "
        "the model's own pooled output (hf)",
        default="cls",
    )
    features: Int = key("input width of mlp towers (image features, SimCLR views)", default=256, ge=1)
    attention: Literal["sdpa", "eager"] = key(
        "sdpa: fused kernels; eager: softmax(QK^T)V spelt out, its probabilities stored, as 2021's BERT did",
        default="sdpa",
    )
    normalize: Bool = key("L2-normalise the representation (transformer, hf)", default=False)
    name_or_path: Str | None = key(
        "hf: a local checkpoint or config folder, or a config.json (its weights if it has them, else random); "
        "sentence-transformers: a local model folder",
        default=None,
    )
    config: HFConfig | None = key(
        "hf: the config inline ([model.config]: model_type and sizes, as AutoConfig.for_model takes them); "
        "over name_or_path's values when both are given",
        default=None,
        shown_type="table or none",
    )
    lora: LoraConfig | None = key(
        "hf: LoRA adapters ([model.lora]: r, alpha, dropout, target_modules; extra lora); none: every weight trains",
        default=None,
        shown_type="table or none",
    )

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be a multiple of model.heads ({self.heads})")

    @property
    def ffn_size(self) -> int:
        return self.ffn or 4 * self.hidden


@typed
class ImageConfig:
    """The image tower of clip and siglip (``[image]`` in an experiment)."""

    kind: ImageKind = key(
        "mlp: an MLP over random feature vectors; hf (real extra): a Hugging Face vision model (ViT, CLIP, "
        "SigLIP, DINOv2) on random pixels",
        default="mlp",
    )
    name_or_path: Str | None = key(
        "hf: a local checkpoint or config folder, or a config.json (a CLIP or SigLIP one: its vision part)",
        default=None,
    )
    config: HFConfig | None = key(
        "hf: the vision config inline ([image.config]: model_type, image_size, patch_size and sizes)",
        default=None,
        shown_type="table or none",
    )
    pooling: Literal["pooler", "cls", "mean"] = key(
        "hf: the model's own pooled output, the first token, or the mean of all tokens", default="pooler"
    )
    features: Int | None = key("mlp: input width (none: model.features)", default=None, ge=1)
    hidden: Int | None = key("mlp: width of its layers (none: model.hidden)", default=None, ge=1)
    layers: Int | None = key("mlp: hidden layers (none: model.layers)", default=None, ge=1)
    dropout: Float | None = key("dropout probability (none: model.dropout)", default=None, ge=0.0, lt=1.0)
    attention: Literal["sdpa", "eager"] | None = key("hf: attention kernels (none: model.attention)", default=None)


@typed
class WorkloadConfig:
    """What is trained on what data (``[workload]`` in an experiment; ``[model]`` and ``[image]`` are its towers)."""

    name: WorkloadName = key(
        "dpr (queries and passages), clip (texts and images), siglip (clip's inputs, sigmoid loss), simclr (two "
        "views), or your own: package.module:function (as factory)",
        flag="--workload",
        default="dpr",
    )
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    query_length: Int = key("tokens per query (dpr), caption (clip, siglip) or view (simclr on text)", default=32, ge=1)
    passage_length: Int = key("tokens per passage (dpr)", default=128, ge=1)
    query_lengths: Str = key(
        "real lengths of the query_length rows (padding after): fixed, uniform[:LOW] (LOW..cap, default half the "
        "cap), lognormal:MEDIAN:SIGMA (capped), msmarco (a capped log-normal, see gcbench.workloads.lengths)",
        default="uniform",
    )
    passage_lengths: Str = key("real lengths of the passage_length rows (dpr), as query_lengths", default="uniform")
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
    factory: Str | None = key(
        "your own workload: package.module:function, called with the seed, returning a gcbench.UserWorkload "
        "(imported from the experiment's folder or the current directory)",
        default=None,
    )

    def __post_init__(self) -> None:
        self.lengths("query")  # impossible parameters are refused here, naming the key
        self.lengths("passage")
        if self.factory is not None and not is_import_path(self.factory):
            raise ValueError(f"workload.factory: {self.factory!r} is not an import path (package.module:function)")
        if self.factory is not None and is_import_path(self.name) and self.name != self.factory:
            raise ValueError(f"workload.name {self.name!r} and workload.factory {self.factory!r}: give one of them")

    def lengths(self, which: Literal["query", "passage"]) -> LengthDistribution:
        """The distribution of the real lengths of the query (caption, view) or passage rows."""
        if which == "query":
            return parse_lengths(self.query_lengths, self.query_length, "workload.query_lengths")
        return parse_lengths(self.passage_lengths, self.passage_length, "workload.passage_lengths")

    def longest_rows(self, inputs: int) -> list[int | None]:
        """The longest row each input of a built-in workload can have, in tokens (an input without a mask counts
        one a row; None: unknown, a user's workload)."""
        if self.user_factory is not None:
            return [None] * inputs
        text = self.model.kind != FEATURE_KIND
        if self.name == "dpr":
            return [self.query_length if text else 1, self.passage_length if text else 1]
        if self.name in IMAGE_TEXT:
            return [self.query_length, 1]
        return [self.query_length if text else 1] * inputs

    @property
    def loss_tile_size(self) -> int | None:
        """``tile_size`` for the loss modules: None for the whole score matrix."""
        return self.loss_tile or None

    @property
    def user_factory(self) -> str | None:
        """The import path of a user's factory (``factory``, or a ``name`` that is one), or None for a built-in."""
        return self.factory or (self.name if is_import_path(self.name) else None)


def image_mlp(workload: WorkloadConfig) -> ModelConfig:
    """The image MLP's sizes: ``[image]``'s, where it sets them, else ``[model]``'s (as before ``[image]`` existed)."""
    image, model = workload.image, workload.model
    return replace(
        model,
        kind=FEATURE_KIND,
        heads=1,
        features=image.features or model.features,
        hidden=image.hidden or model.hidden,
        layers=image.layers or model.layers,
        dropout=model.dropout if image.dropout is None else image.dropout,
    )
